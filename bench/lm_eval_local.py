"""lm-evaluation-harness against `moekit serve`: a generation task and a multiple-choice (loglikelihood) task on
local data files, with the harness's scores checked against the model itself.

    pip install "lm-eval[api]"                             # not a moekit dependency
    python bench/lm_eval_local.py --model runs/tiny        # a moekit run or a Hugging Face folder

What it does: writes two tasks built from the Python standard library the default corpus comes from (lines of
its source: the multiple-choice task picks a line's true ending among 4 endings of other lines, scored by
loglikelihood; the generation task completes a line, scored by exact match), starts `moekit serve` on a free port,
runs `lm_eval --model local-completions` with the remote tokenizer (moekit's /tokenizer_info, /tokenize and
/detokenize, as the harness uses vLLM's), then recomputes every loglikelihood the harness logged with one forward
pass of the model over context + continuation in this process, and prints JSON: the harness's metrics, the
largest |harness - oracle| loglikelihood difference, and whether each multiple-choice pick agrees.
Runs offline (HF_DATASETS_OFFLINE): the data are local JSONL files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

MC_YAML = """task: moekit_stdlib_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

GEN_YAML = """task: moekit_stdlib_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{ending}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
"""


def stdlib_lines(n: int, seed: int) -> list[str]:
    """Distinct, ordinary lines of the standard library's source (what the default corpus trains on)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    lines = set()
    for f in sorted(lib.glob("json/*.py")) + sorted(lib.glob("collections/*.py")) + [lib / "textwrap.py"]:
        for line in f.read_text(errors="replace").splitlines():
            s = line.strip()  # no indentation: a context is never only spaces (the harness moves trailing spaces)
            if 24 <= len(s) <= 72 and not s.startswith("#") and s.isascii():
                lines.add(s)
    lines = sorted(lines)
    random.Random(seed).shuffle(lines)
    return lines[:n]


def write_tasks(folder: Path, n: int, seed: int) -> None:
    lines = stdlib_lines(n * 4, seed)
    rng = random.Random(seed)
    mc, gen = [], []
    for i in range(n):
        line = lines[i]
        cut = len(line) // 2
        context, ending = line[:cut], line[cut:]
        others = [x[len(x) // 2:] for x in lines[n + 3 * i:n + 3 * i + 3]]
        choices = others + [ending]
        rng.shuffle(choices)
        mc.append({"context": context, "choices": choices, "answer": choices.index(ending)})
        gen.append({"context": context, "ending": ending})
    for name, rows, yaml in (("mc", mc, MC_YAML), ("gen", gen, GEN_YAML)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(yaml.format(data=data))


def start_server(model: str, log: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "moekit.cli", "serve", "--model", model, "--served-model-name", "m", "--port", "0",
           "--threads", "1", "--log-interval", "0", "--no-access-log"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"moekit serve exited with {proc.returncode}:\n{log.read_text()}")
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if m:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/health", timeout=5) as r:
                    if r.status == 200:
                        return proc, int(m.group(1))
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"moekit serve did not become ready:\n{log.read_text()}")


@torch.no_grad()
def oracle_loglikelihood(model, codec, context: str, continuation: str) -> tuple[float, bool]:
    """The harness's loglikelihood by one forward pass: context and continuation tokenized as its remote
    tokenizer does (no special tokens; the context's tokens, then the rest of the whole string's), summed logprobs of
    the continuation, and whether it is the greedy continuation."""
    enc = lambda s: codec.tokenizer.encode(s, add_special_tokens=False).ids
    n_spaces = len(context) - len(context.rstrip())  # the harness moves a context's trailing spaces (_encode_pair)
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = enc(context + continuation), enc(context)
    cont = whole[len(ctx):]
    ids = ctx + cont
    lp_TV = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    rows = lp_TV[len(ctx) - 1:len(ids) - 1]
    chosen = rows.gather(-1, torch.tensor(cont)[:, None])[:, 0]
    return float(chosen.sum()), bool((rows.argmax(-1) == torch.tensor(cont)).all())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a moekit run or a Hugging Face model folder")
    p.add_argument("--items", type=int, default=40, help="items per task (default 40)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: pip install \"lm-eval[api]\"") from None
    work = Path(tempfile.mkdtemp(prefix="moekit-lm-eval-"))
    write_tasks(work, args.items, args.seed)
    proc, port = start_server(args.model, work / "server.log")
    try:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"model=m,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=remote,"
               "num_concurrent=4,max_retries=1,tokenized_requests=True",
               "--tasks", "moekit_stdlib_mc,moekit_stdlib_gen", "--include_path", str(work),
               "--output_path", str(work / "out"), "--log_samples"]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            raise SystemExit(f"lm_eval failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    finally:
        proc.terminate()
        proc.wait(60)
    table = "\n".join(line for line in run.stdout.splitlines() if line.startswith("|"))
    results = json.loads(next((work / "out").rglob("results_*.json")).read_text())["results"]

    from moekit.infer.loader import load_model

    model, codec = load_model(args.model)
    worst, agree, n_mc = 0.0, 0, 0
    for f in (work / "out").rglob("samples_moekit_stdlib_mc_*.jsonl"):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            harness = [r[0] for r in s["resps"]]  # one [loglikelihood, is_greedy] per choice, as strings
            mine = [oracle_loglikelihood(model, codec, a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
            for (h_ll, _), (o_ll, _) in zip(harness, mine, strict=True):
                worst = max(worst, abs(float(h_ll) - o_ll))
            n_mc += 1
            agree += max(range(len(mine)), key=lambda i: mine[i][0]) == max(range(len(harness)),
                                                                          key=lambda i: float(harness[i][0]))
    print(table, file=sys.stderr)
    print(json.dumps({"model": args.model, "items_per_task": args.items, "lm_eval_wall_s": round(wall, 1),
                      "mc_acc": results["moekit_stdlib_mc"].get("acc,none"), "mc_chance": 0.25,
                      "gen_exact_match": results["moekit_stdlib_gen"].get("exact_match,none"),
                      "mc_items_checked": n_mc, "mc_picks_agreeing_with_oracle": agree,
                      "max_abs_loglikelihood_diff": worst}, indent=1))


if __name__ == "__main__":
    main()

"""`moekit serve --step-log`: one JSON line per engine step, in which every request's tokens are accounted for.

One server subprocess (a 32-token step budget, so that long prompts are chunked) gets a few completions, some
concurrent, one with n=2; after it stops, the log must hold: the engine header; each request added before it is
first scheduled, with the prompt length the server used; contiguous chunks (each starts where the last ended, the
first at 0 or after prefix-cached blocks) whose tokens add up to prompt + output - 1; logits only on chunks that
reach the end; times that never go back. `moekit sim calibrate` then fits the log's steps and gaps.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve_utils import ServerProcess, request, write_run

from moekit.serve.config import ServeConfig
from moekit.sim import calibrate


def _complete(port: int, prompt: str, max_tokens: int, n: int = 1) -> dict:
    status, _, body = request(port, "POST", "/v1/completions", {
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "n": n, "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    return json.loads(body)


def test_step_log_accounts_for_every_token(tmp_path):
    write_run(tmp_path / "run", seed=2)
    log_path = tmp_path / "steps.jsonl"
    server = ServerProcess(tmp_path / "run", tmp_path / "server.log", "--step-log", str(log_path),
                           "--max-num-batched-tokens", "32")
    try:
        first = _complete(server.port, "a long prompt that needs two or more chunks of 32 tokens to prefill it", 6)
        jobs = [(f"concurrent request number {i}: " + "x" * (9 * i), 4 + 3 * i) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            rest = list(pool.map(lambda j: _complete(server.port, *j), jobs))
        both = _complete(server.port, "two choices", 5, n=2)
    finally:
        assert server.stop() == 0, server.output()
    rows = [json.loads(x) for x in log_path.read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert header["kind"] == "moekit-step-log" and header["engine"]["max_num_batched_tokens"] == 32

    expect = {f"{r['id']}-0": r["usage"] for r in [first, *rest]}
    expect.update({f"{both['id']}-{i}": {"prompt_tokens": both["usage"]["prompt_tokens"],
                                         "completion_tokens": both["usage"]["completion_tokens"] // 2}
                   for i in range(2)})
    added, chunks, finished = {}, {}, set()
    last_t = -1.0
    for k, row in enumerate(rows):
        assert row["t_loop"] >= last_t, f"line {k + 2}: time went back"
        for rid, prompt_len, _, queued in row["added"]:
            assert rid not in added
            # Queued by the HTTP side before the engine thread drained its commands, which precedes the step.
            assert 0 <= queued <= row.get("t0", queued), "queued for the engine after the step that took it"
            added[rid] = prompt_len
        if "t0" not in row:
            continue
        assert row["t_loop"] <= row["t0"] <= row["t1"]
        last_t = row["t1"]
        assert row["preempted"] == [] and row["scheduled"]
        assert sum(n for _, n, *_ in row["scheduled"]) <= 32
        for rid, n, computed, n_spec, n_logits in row["scheduled"]:
            assert rid in added, f"{rid} scheduled before it was added"
            assert rid not in finished and n_spec == 0
            prev = chunks.setdefault(rid, [])
            if prev:
                assert computed == prev[-1][0] + prev[-1][1], "chunks must be contiguous"
            else:  # from 0, or from the prefix cache's full blocks (the n=2 choices share their prompt)
                assert computed % header["engine"]["block_size"] == 0 and computed < added[rid]
            reaches_end = computed + n >= added[rid]
            assert n_logits == (1 if reaches_end else 0)
            prev.append((computed, n))
        assert row["outputs"] == sum(1 for e in row["scheduled"] if e[4])
        finished.update(row["finished"])
    assert set(added) == set(expect) == finished == set(chunks)
    for rid, usage in expect.items():
        assert added[rid] == usage["prompt_tokens"]
        cached = chunks[rid][0][0]
        assert cached + sum(n for _, n in chunks[rid]) == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    long_rid = f"{first['id']}-0"
    assert len(chunks[long_rid]) - first["usage"]["completion_tokens"] >= 1  # its prompt took 2+ chunks
    assert max(len(r["scheduled"]) for r in rows if "t0" in r) > 1  # some steps batched several requests
    # What `moekit sim calibrate --from-step-log` makes of it: the server's settings and experts, busy gaps.
    prof = calibrate.profile_from_log(log_path)
    assert prof.engine["max_num_batched_tokens"] == 32 and prof.moe == {"n_expert": 4, "top_k": 2, "layers": 1}
    assert prof.fit["gap"]["samples"] > 10 and prof.gap_seconds(1, 0) > 0


def test_step_log_flag_is_checked(tmp_path):
    with pytest.raises(ValueError, match="--step-log .*existing folder"):
        ServeConfig(model="run", step_log=str(tmp_path / "no-such-dir" / "steps.jsonl"))
    ServeConfig(model="run", step_log=str(tmp_path / "steps.jsonl"))

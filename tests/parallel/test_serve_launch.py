"""`moekit serve --tp/--pp/--ep` as a user runs it: bad layouts refused before any worker starts, the official
`openai` client against a tp2 server, per-worker /metrics, and a worker SIGKILLed during a streaming request."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from test_serve_utils import API_KEY, ServerProcess, encode, request, write_run

from moekit.infer.engine import Engine
from moekit.infer.sampler import SamplingParams

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the process list from /proc")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("launch") / "run"
    model = write_run(folder, n_layer=2, n_kv_head=2)
    return folder, model


def workers_of(run_dir) -> list[int]:
    """Pids of serve workers of this run that are alive (the test's own process list, from /proc)."""
    out = subprocess.run(["pgrep", "-f", f"moekit.infer.worker --model {run_dir}"], capture_output=True,
                         text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.parametrize(("flags", "message"), [
    (["--tp", "3"], "--tp 3 must divide the 4 query heads: choose one of 1, 2"),
    (["--pp", "3"], "--pp 3 is more stages than the 2 layers: choose --pp from 1 to 2"),
    (["--tp", "2", "--ep", "3"], "--ep 3 must divide the 4 experts: choose one of 1, 2, 4"),
])
def test_a_bad_layout_is_one_line_exit_2_and_starts_no_worker(run_dir, flags, message):
    folder, _ = run_dir
    res = subprocess.run([sys.executable, "-m", "moekit.cli", "serve", "--model", str(folder), "--port", "0", *flags],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "Warning" not in ln and ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert workers_of(folder) == []


def test_openai_client_metrics_and_a_worker_killed_mid_stream(run_dir, tmp_path):
    import openai

    folder, model = run_dir
    server = ServerProcess(folder, tmp_path / "serve.log", "--tp", "2", "--api-key", API_KEY)
    try:
        pids = {int(r): int(p) for r, p in re.findall(r"worker (\d) \(stage 0, tensor rank \d, pid (\d+)\) ready",
                                                       server.output())}
        assert sorted(pids) == [0, 1] and sorted(workers_of(folder)) == sorted(pids.values())
        client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        got = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0)
        want = Engine(model, None).generate([encode("Hello")], SamplingParams(temperature=0, max_tokens=12))[0]
        assert got.usage.completion_tokens == len(want.token_ids)
        from test_serve_utils import ascii_tokenizer

        assert got.choices[0].text == ascii_tokenizer().decode(want.token_ids)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0, stream=True)
        assert sum(1 for c in chat if c.choices and c.choices[0].delta.content) > 0
        m = server.metrics()
        for r in (0, 1):
            assert m[f'moekit_worker_weight_bytes{{rank="{r}",stage="0",tensor_rank="{r}"}}'] > 0
            assert m[f'moekit_worker_kv_cache_blocks{{rank="{r}",stage="0",tensor_rank="{r}"}}'] > 0

        stream = client.completions.create(model="tiny", prompt="Once", max_tokens=100, temperature=0.8, n=16,
                                           seed=1, stream=True)
        failed = None
        try:
            for i, _ in enumerate(stream):
                if i == 0:
                    subprocess.run(["kill", "-9", str(pids[1])], check=True)
        except openai.APIError as e:  # the stream's error event (or the connection closed by the exiting server)
            failed = e
        assert failed is not None, "the stream finished although a worker was killed in its middle"
        t0 = time.monotonic()
        server.proc.wait(timeout=30)
        assert time.monotonic() - t0 < 30
        assert server.proc.returncode != 0
        assert f"worker 1 (stage 0, tensor rank 1, pid {pids[1]}) died: killed by signal 9" in server.output()
        assert workers_of(folder) == []
    finally:
        server.stop()


def test_torchrun_ranks_serve_as_one_server(run_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m moekit serve --tp 2`: rank 0 serves HTTP, rank 1 is its worker."""
    folder, model = run_dir
    server = ServerProcess(folder, tmp_path / "torchrun.log", "--tp", "2",
                           launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2"))
    try:
        status, _, body = request(server.port, "POST", "/v1/completions",
                                  {"model": "tiny", "prompt": [0, 40, 41], "max_tokens": 10, "temperature": 0})
        assert status == 200, body
        want = Engine(model, None).generate([[0, 40, 41]], SamplingParams(temperature=0, max_tokens=10))[0]
        from test_serve_utils import ascii_tokenizer

        assert json.loads(body)["choices"][0]["text"] == ascii_tokenizer().decode(want.token_ids)
        assert "worker 1 (stage 0, tensor rank 1, pid" in server.output()
    finally:
        server.stop()  # (torchrun itself exits 1 on SIGTERM, whatever its ranks do: check the ranks instead)
    out = server.output()
    assert "moekit serve: stopped" in out  # rank 0 drained and stopped
    assert out.count("Traceback") == out.count("SignalException: Process")  # torchrun's own, nothing of ours

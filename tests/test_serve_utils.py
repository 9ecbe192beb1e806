"""Helpers shared by tests/test_serve_*.py: a tiny random moekit run on disk, a `moekit serve` subprocess,
raw HTTP and /metrics parsing. (No tests here.)

The model is tests/conftest.py's tiny MoE (2 layers, 4 experts, top-2, 128-token context)
with a 97-token vocabulary: `<|endoftext|>` and one token per printable ASCII character and newline,
so any ASCII text (the default chat template's "User:" included) round-trips exactly.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import char_tokenizer, save_run, tiny_model
from tokenizers import Tokenizer

ASCII = [chr(i) for i in range(32, 127)] + ["\n"]
API_KEY = "test-key-123"


def ascii_tokenizer() -> Tokenizer:
    return char_tokenizer(ASCII)


def write_run(folder: Path, seed: int = 0, **overrides):
    """A run folder as `moekit train` leaves it: config.json, tokenizer.json, model.safetensors; the model."""
    model = tiny_model(seed, vocab_size=97, tie_embeddings=True, **overrides)
    save_run(folder, model, ascii_tokenizer())
    return model


def encode(text: str) -> list[int]:
    """What the server feeds the model for a text prompt: a moekit run starts documents with <|endoftext|>."""
    return [0] + ascii_tokenizer().encode(text, add_special_tokens=False).ids


class ServerProcess:
    """`moekit serve` on a free loopback port (--port 0; the port is read from its log)."""

    def __init__(self, run_dir: Path, log_path: Path, *extra: str, launcher: tuple[str, ...] = (),
                 threads: int | None = 1):
        """launcher: what runs `-m moekit.cli` instead of this Python (e.g. torchrun's module and its flags);
        threads: --threads (None: the server's default)."""
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = [sys.executable, *launcher, "-m", "moekit.cli", "serve", "--model", str(run_dir),
               "--served-model-name", "tiny", "--port", "0", "--kv-cache-gb", "0.02",
               "--log-interval", "0", "--no-access-log", *(("--threads", str(threads)) if threads else ()), *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                           "PYTHONUNBUFFERED": "1"})
        self.port = self._wait_ready()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _wait_ready(self, timeout: float = 120.0) -> int:
        deadline, port = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moekit serve exited with {self.proc.returncode}:\n{self.output()}")
            if port is None and (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.output())):
                port = int(m.group(1))
            if port is not None:
                try:
                    if request(port, "GET", "/health")[0] == 200:
                        return port
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"moekit serve did not become ready in {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(request(self.port, "GET", "/metrics")[2].decode())

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """/metrics once nothing runs or waits and every KV block is free (polls; fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["moekit_num_requests_running"] == m["moekit_num_requests_waiting"] == 0
                    and m["moekit_kv_cache_blocks_used"] == 0):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"the server is not idle after {timeout} s: {m}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def request(port: int, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
            timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request (bytes go out as they are): status, lower-cased headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def tiny_engine(seed: int = 0, max_seq_len: int = 128, **engine_kw):
    """An Engine over the tiny model with the ASCII tokenizer, as `load_model` would give for a run."""
    from moekit.infer.engine import Engine
    from moekit.infer.tokenizer import TextCodec

    model = tiny_model(seed, vocab_size=97, tie_embeddings=True, max_seq_len=max_seq_len)
    codec = TextCodec(ascii_tokenizer(), prefix_ids=(0,), eos_token_ids=(0,), add_special_tokens=False)
    return Engine(model, codec, num_blocks=512, block_size=16, **engine_kw)


class InProcessServer:
    """`build_app` served by uvicorn in a thread of the test process: for tests that need to reach inside
    (hold the model loading, fail the engine, drain). Use as a context manager."""

    def __init__(self, load, template=None, drain_timeout: float | None = None, **cfg):
        import socket
        import threading

        import uvicorn

        from moekit.serve.app import build_app
        from moekit.serve.config import ServeConfig

        self.app = build_app(ServeConfig(model="in-process", served_model_names=["tiny"], log_interval=0, **cfg),
                             load, template)
        self.openai_server = self.app.state.server
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="critical", lifespan="on",
                                                    timeout_graceful_shutdown=drain_timeout))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while request(self.port, "GET", "/health")[0] != 200:
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.01)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

"""`moekit serve`: an OpenAI-compatible HTTP server for a moekit run or a Hugging Face model folder.

    moekit serve --model runs/tiny                                   # http://127.0.0.1:8000/v1
    moekit serve --model Mixtral-8x7B-v0.1 --quantize int8 --kv-cache-gb 20 --api-key "$KEY"
    moekit serve --model runs/big --draft runs/small --host 0.0.0.0 --port 8080
    MOEKIT_API_KEY=secret moekit serve --model runs/tiny --port 0   # any free port; the log says which
    moekit serve --model runs/tiny --step-log steps.jsonl            # every step's batch and time, for `moekit sim`

It binds 127.0.0.1 unless told otherwise (--host 0.0.0.0 to listen on every interface). The port
is bound first, so that a busy port is a one-line error; then the model loads in the engine
thread while the server already answers (/health and every endpoint: 503 until it is ready).
SIGTERM or Ctrl-C drains: new requests get 503, requests in flight finish (for at most
--drain-timeout seconds, then they are cancelled), the engine stops, and the process exits 0.
Logs go to standard error: uvicorn's access log, and one engine stats line per --log-interval.
A client that stalls mid-request is answered 408 and dropped (--header-timeout, --body-timeout), and open
connections are capped (--max-connections, then 503): moekit/serve/http.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from moekit.infer.build import add_engine_arguments, build_engine
from moekit.infer.engine import Engine
from moekit.serve.config import MAX_N, ServeConfig
from moekit.serve.tools import PARSERS

log = logging.getLogger("moekit.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="RUN|HF_DIR", help="a moekit run or a Hugging Face folder")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME", dest="served_model_names", default=[],
                   help="the model name(s) clients use (default: the --model path, as vLLM)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("MOEKIT_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $MOEKIT_API_KEY, else no key)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM; with --ssl-keyfile)")
    p.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    g = p.add_argument_group("engine")
    add_engine_arguments(g)
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the usable cores less one for the HTTP loop and less those "
                        "other work keeps busy at start-up)")
    a = p.add_argument_group("API")
    a.add_argument("--chat-template", metavar="FILE|TEMPLATE|default",
                   help="Jinja chat template (default: the model's, else the plain-text default of moekit.serve.chat)")
    a.add_argument("--tool-call-parser", choices=PARSERS,
                   help="the format of the model's tool calls, for tool_choice auto (default: guessed from the chat "
                        "template: <tool_call> hermes, [TOOL_CALLS] mistral, <|python_tag|> llama3_json)")
    a.add_argument("--max-tokens-default", type=int, default=256,
                   help="max_tokens of a request that sets none (default 256, capped by the context left)")
    a.add_argument("--max-n", type=int, default=MAX_N, help=f"choices per request, n x prompts (default {MAX_N})")
    a.add_argument("--max-waiting", type=int, default=1024,
                   help="requests waiting for a running slot before new ones get 429 (default 1024)")
    a.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="largest request body; larger ones get 413 (default 8 MiB)")
    c = p.add_argument_group("connections")
    c.add_argument("--header-timeout", type=float, default=20.0,
                   help="seconds a request's headers may take from their first byte; then 408 (default 20)")
    c.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds without a byte of a request body before 408 and close (default 30)")
    c.add_argument("--max-connections", type=int, default=2048,
                   help="open connections beyond which requests get 503 (default 2048)")
    o = p.add_argument_group("operation")
    o.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take to finish before they are cancelled (30)")
    o.add_argument("--log-interval", type=float, default=10.0, help="seconds between engine stats lines (0 = off)")
    o.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every HTTP request")
    o.add_argument("--step-log", metavar="FILE.jsonl",
                   help="write one JSON line per engine step (its batch and timing) for `moekit sim replay|calibrate`")
    o.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


def _check_model_dir(path: str, flag: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{flag} {path} is not a folder: give a moekit run or a Hugging Face folder")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path} has no config.json: is it a moekit run or a Hugging Face folder?")


def engine_loader(cfg: ServeConfig) -> Callable[[], Engine]:
    """A function that loads the model(s) and builds the Engine (run in the engine thread). The device was
    checked when `cfg` was made, so that a bad --device is a one-line error at start."""

    def load() -> Engine:
        from moekit.infer.executor import torchrun_rank

        engine = build_engine(cfg, progress=log.info, launch="torchrun" if torchrun_rank() == 0 else "spawn")
        m = engine.metrics()
        log.info("model %s loaded: %s | context %d tokens | KV cache %d blocks of %d tokens | %s", cfg.model,
                 cfg.describe(), engine.max_model_len, m["kv_blocks_total"], m["kv_block_size"],
                 "tokenizer" if engine.codec else "no tokenizer (token-id prompts only)")
        t0 = time.perf_counter()
        n = engine.capture_graphs()  # now, as vLLM does, so that no request waits for a capture
        if n:
            log.info("captured %d CUDA graphs for decode steps in %.1f s", n, time.perf_counter() - t0)
        return engine

    return load


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    from moekit.serve.app import build_app
    from moekit.serve.chat import load_chat_template
    from moekit.serve.http import raise_open_file_limit, uvicorn_config

    if args.overrides:
        raise ValueError(f"moekit serve takes no model overrides (got --{', --'.join(args.overrides)})")
    cfg = ServeConfig.from_args(args)
    _check_model_dir(cfg.model, "--model")
    if cfg.draft:
        _check_model_dir(cfg.draft, "--draft")
    from moekit.infer.executor import join_as_worker, torchrun_rank

    if torchrun_rank():  # `torchrun --nproc-per-node N -m moekit serve ...`: ranks > 0 are workers of rank 0's server
        from moekit.infer.build import worker_spec

        join_as_worker(worker_spec(cfg)[0])
        return 0
    if cfg.sharded:
        from moekit.infer.build import worker_spec

        worker_spec(cfg)  # a layout that cannot serve this model: one line, exit 2, before any worker starts
    template = load_chat_template(cfg.model, cfg.chat_template)
    load = engine_loader(cfg)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = _set_threads(cfg.threads)
    sock = _listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    for f in (args.ssl_certfile, args.ssl_keyfile):
        if f and not Path(f).is_file():
            raise FileNotFoundError(f"{f}: no such file")
    app = build_app(cfg, load, template)
    raise_open_file_limit(cfg.max_connections)
    server = _Server(uvicorn_config(app, cfg, log_level=args.log_level, access_log=cfg.access_log,
                                    timeout_graceful_shutdown=cfg.drain_timeout, lifespan="on",
                                    ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile),
                     app.state.server)
    app.state.server.engine.on_fatal = server.request_exit
    app.state.server.engine.step_log = cfg.step_log  # opened by the engine thread once the model is loaded
    if cfg.threads is None:  # the default follows the load as it changes (--threads N stays N)
        from moekit.cpu import ThreadGovernor

        app.state.server.engine.governor = ThreadGovernor(reserve=1, threads=threads)
    url_host = f"[{host}]" if ":" in host else host
    log.info("moekit serve: listening on %s://%s:%d/v1 (chat template: %s; %s)", "https" if args.ssl_certfile else
             "http", url_host, port, template.origin, "API key required" if cfg.api_key else "no API key")
    # uvicorn re-raises a caught SIGTERM/SIGINT once it has drained; no-op handlers make that a clean exit.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    engine = app.state.server.engine
    if engine.state == "failed":
        print(f"moekit: error: {engine.error}", file=sys.stderr)
        return 1
    log.info("moekit serve: stopped")
    return 0


def _set_threads(threads: int | None) -> int:
    """torch's intra-op threads: --threads, else the cores this process may use less one for the event loop and
    less those other work keeps busy now (moekit/cpu.py; re-checked while serving: cpu.ThreadGovernor); a warning
    when that oversubscribes the cores. Returns the count."""
    import torch

    from moekit import cpu

    busy = cpu.busy_cores(0.2)
    n = threads or cpu.default_threads(reserve=1, busy=busy)
    torch.set_num_threads(n)
    why = cpu.oversubscribed(n, reserve=1, busy=busy)
    if why:
        log.warning("the CPU is oversubscribed: %s", why)
    log.info("torch threads: %d (%s; %d usable cores, %s busy with other work)", n,
             "--threads" if threads else "default", cpu.usable_cores(), "?" if busy is None else f"{busy:.1f}")
    return n


class _Server(uvicorn.Server):
    """uvicorn's Server, where the first SIGTERM/SIGINT also starts draining (503 for new requests)."""

    def __init__(self, config: uvicorn.Config, openai_server):
        super().__init__(config)
        self.openai_server = openai_server

    def handle_exit(self, sig, frame) -> None:
        self.openai_server.drain()
        super().handle_exit(sig, frame)

    def request_exit(self) -> None:  # the engine died: stop serving, exit 1
        self.should_exit = True

"""`moekit serve`: an OpenAI-compatible HTTP server for a moekit run or a Hugging Face model folder.

    moekit serve --model runs/tiny                                   # http://127.0.0.1:8000/v1
    moekit serve --model Mixtral-8x7B-v0.1 --quantize int8 --kv-cache-gb 20 --api-key "$KEY"
    moekit serve --model runs/big --draft runs/small --host 0.0.0.0 --port 8080
    MOEKIT_API_KEY=secret moekit serve --model runs/tiny --port 0   # any free port; the log says which

It binds 127.0.0.1 unless told otherwise (--host 0.0.0.0 to listen on every interface). The port
is bound first, so that a busy port is a one-line error; then the model loads in the engine
thread while the server already answers (/health and every endpoint: 503 until it is ready).
SIGTERM or Ctrl-C drains: new requests get 503, requests in flight finish (for at most
--drain-timeout seconds, then they are cancelled), the engine stops, and the process exits 0.
Logs go to standard error: uvicorn's access log, and one engine stats line per --log-interval.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import uvicorn

from moekit.serve.config import MAX_N, ServeConfig
from moekit.util import resolve_device, resolve_dtype

log = logging.getLogger("moekit.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="RUN|HF_DIR", help="a moekit run or a Hugging Face folder")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the model name(s) clients use (default: the --model path, as vLLM)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("MOEKIT_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $MOEKIT_API_KEY, else no key)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM; with --ssl-keyfile)")
    p.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    g = p.add_argument_group("engine")
    g.add_argument("--draft", metavar="RUN|HF_DIR", help="speculative decoding with this smaller model")
    g.add_argument("--ngram", action="store_true", help="speculative decoding by prompt lookup (no draft model)")
    g.add_argument("--num-spec-tokens", type=int, default=4, help="draft tokens per step (default 4)")
    g.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8 weight-only quantization")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and activations (auto: bfloat16 on a GPU, float32 on a CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache size in GiB (default 1)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once (default 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (default 2048)")
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request "
                   "(default: the model's context, capped by the KV cache)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: launch every decode kernel from Python")
    a = p.add_argument_group("API")
    a.add_argument("--chat-template", metavar="FILE|TEMPLATE|default",
                   help="Jinja chat template (default: the model's, else the plain-text default of moekit.serve.chat)")
    a.add_argument("--max-tokens-default", type=int, default=256,
                   help="max_tokens of a request that sets none (default 256, capped by the context left)")
    a.add_argument("--max-n", type=int, default=MAX_N, help=f"choices per request, n x prompts (default {MAX_N})")
    a.add_argument("--max-waiting", type=int, default=1024,
                   help="requests waiting for a running slot before new ones get 429 (default 1024)")
    a.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="largest request body; larger ones get 413 (default 8 MiB)")
    o = p.add_argument_group("operation")
    o.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take to finish before they are cancelled (30)")
    o.add_argument("--log-interval", type=float, default=10.0, help="seconds between engine stats lines (0 = off)")
    o.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    o.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        model=args.model, served_model_names=args.served_model_name or [], host=args.host, port=args.port,
        api_key=args.api_key, draft=args.draft, ngram=args.ngram, num_spec_tokens=args.num_spec_tokens,
        quantize=args.quantize, dtype=args.dtype, device=args.device, threads=args.threads,
        kv_cache_gb=args.kv_cache_gb, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
        chat_template=args.chat_template,
        max_tokens_default=args.max_tokens_default, max_n=args.max_n, max_waiting=args.max_waiting,
        max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout, log_interval=args.log_interval,
        access_log=not args.no_access_log)


def _check_model_dir(path: str, flag: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{flag} {path} is not a folder: give a moekit run or a Hugging Face folder")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path} has no config.json: is it a moekit run or a Hugging Face folder?")


def engine_loader(cfg: ServeConfig):
    """A function that loads the model(s) and builds the Engine (run in the engine thread)."""
    device = resolve_device(cfg.device)  # checked now, so that a bad --device is a one-line error at start
    dtype = resolve_dtype(cfg.dtype, device, cfg.quantize)

    def load():
        from moekit.infer.engine import Engine
        from moekit.infer.loader import load_model
        from moekit.infer.quant import quantize_int8

        model, codec = load_model(cfg.model, dtype, device)
        draft = None
        if cfg.draft:
            draft, draft_codec = load_model(cfg.draft, dtype, device)
            if codec is not None and (draft_codec is None or not codec.same_vocabulary(draft_codec)):
                raise ValueError(f"--draft {cfg.draft} does not use the tokenizer of --model {cfg.model}")
        if cfg.quantize == "int8":
            quantize_int8(model)
        engine = Engine(model, codec, kv_cache_gb=cfg.kv_cache_gb, block_size=cfg.block_size,
                        max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                        max_model_len=cfg.max_model_len, enable_prefix_caching=cfg.enable_prefix_caching,
                        draft=draft, ngram=cfg.ngram, num_spec_tokens=cfg.num_spec_tokens,
                        enforce_eager=cfg.enforce_eager)
        m = engine.metrics()
        log.info("model %s loaded: %s %s%s | context %d tokens | KV cache %d blocks of %d tokens | %s", cfg.model,
                 device, str(dtype).removeprefix("torch."), " int8" if cfg.quantize == "int8" else "",
                 engine.max_model_len, m["kv_blocks_total"], m["kv_block_size"],
                 "tokenizer" if codec else "no tokenizer (token-id prompts only)")
        graphs = engine.runner.graphs
        if graphs is not None:  # capture now, as vLLM does, so that no request waits for a capture
            t0 = time.perf_counter()
            n = graphs.capture_all((1,) if engine.proposer is None else (1, engine.num_spec_tokens + 1))
            log.info("captured %d CUDA graphs for decode steps of up to %d requests in %.1f s", n,
                     max(graphs.sizes, default=0), time.perf_counter() - t0)
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

    if args.overrides:
        raise ValueError(f"moekit serve takes no model overrides (got --{', --'.join(args.overrides)})")
    cfg = config_from_args(args)
    _check_model_dir(cfg.model, "--model")
    if cfg.draft:
        _check_model_dir(cfg.draft, "--draft")
    template = load_chat_template(cfg.model, cfg.chat_template)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    load = engine_loader(cfg)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = _listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    for f in (args.ssl_certfile, args.ssl_keyfile):
        if f and not Path(f).is_file():
            raise FileNotFoundError(f"{f}: no such file")
    app = build_app(cfg, load, template)
    server = _Server(uvicorn.Config(app, log_level=args.log_level, access_log=cfg.access_log,
                                    timeout_graceful_shutdown=cfg.drain_timeout, lifespan="on",
                                    ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile),
                     app.state.server)
    app.state.server.engine.on_fatal = server.request_exit
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

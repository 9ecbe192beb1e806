"""ServeConfig: every setting of `moekit serve`, validated in `__post_init__` (a bad value names its flag).

The defaults follow vLLM's `vllm serve` where it has one (block size 16, 256 running requests,
2048 batched tokens per step, prefix caching on, 127.0.0.1 unless told otherwise is ours: a
server that binds every interface by accident is a security bug). Limits that vLLM leaves open
(waiting queue, body size, n) are explicit here, so that overload and hostile input get a clear
4xx instead of memory growth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moekit.infer.build import EngineConfig
from moekit.serve.tools import PARSERS

MAX_N = 128  # OpenAI rejects n > 128


@dataclass
class ServeConfig(EngineConfig):
    """The engine's settings (model, draft, quantize, KV cache, batching: EngineConfig) and the server's."""

    served_model_names: list[str] = field(default_factory=list)  # default: [model], as vLLM
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    # API
    chat_template: str | None = None  # a file or an inline Jinja template; None: the model's, else the default
    tool_call_parser: str | None = None  # how "auto" tool calls are read from the output (tools.PARSERS); None: guess
    max_tokens_default: int = 256  # max_tokens when a request gives none (capped by the context left)
    max_n: int = MAX_N  # choices per request (n x prompts)
    max_waiting: int = 1024  # requests waiting for a running slot before new ones get 429
    max_body_bytes: int = 8 * 1024 * 1024
    # connections (moekit/serve/http.py): slow or idle clients must not hold the server
    header_timeout: float = 20.0  # seconds for a request's headers, from its first byte (Apache reqtimeout: 20)
    body_timeout: float = 30.0  # seconds without a byte of a body the server is waiting for (nginx client_body_timeout)
    max_connections: int = 2048  # more open connections get 503 (>= max_waiting + max_num_seqs: 429 still works)
    # operation
    drain_timeout: float = 30.0  # on SIGTERM, seconds to let in-flight requests finish before cancelling them
    log_interval: float = 10.0  # seconds between engine stats lines (0: off)
    access_log: bool = True
    step_log: str | None = None  # JSONL of every engine step (moekit/serve/async_engine.py _StepLog); None: off

    def __post_init__(self) -> None:
        super().__post_init__()  # the engine's flags
        if not self.served_model_names:
            self.served_model_names = [self.model]
        if any(not n for n in self.served_model_names):
            raise ValueError("--served-model-name must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535] (0: any free port), got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key is empty: give a key, or leave the flag out to serve without one")
        positive = {"max_tokens_default": "--max-tokens-default", "max_n": "--max-n",
                    "max_body_bytes": "--max-body-bytes"}
        for name, flag in positive.items():
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"--tool-call-parser must be one of {', '.join(PARSERS)}, got {self.tool_call_parser!r}")
        if self.max_n > MAX_N:
            raise ValueError(f"--max-n must be <= {MAX_N} (OpenAI's limit), got {self.max_n}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.max_waiting < 0:
            raise ValueError(f"--max-waiting must be >= 0 (0: no queue, only running slots), got {self.max_waiting}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:  # `not >`: NaN is refused too
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {self.max_connections}")
        if self.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout}")
        if self.step_log is not None:
            log_path = Path(self.step_log)
            if log_path.is_dir() or not log_path.parent.is_dir():
                raise ValueError(f"--step-log {self.step_log}: give a file in an existing folder")
        if self.log_interval < 0:
            raise ValueError(f"--log-interval must be >= 0 seconds (0: off), got {self.log_interval}")

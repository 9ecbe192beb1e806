"""The HTTP/1.1 connection layer of `moekit serve`: uvicorn's h11 protocol with timeouts, a connection cap, and
OpenAI-shaped errors for what uvicorn would answer itself in plain text.

    config = uvicorn_config(app, cfg, log_level="info")   # cfg: ServeConfig; cli.py does this
    uvicorn.Server(config).run(sockets=[sock])

uvicorn answers some requests before the app sees them: a request its parser rejects (a malformed request
line or Content-Length) gets `400 Invalid HTTP request received.` in plain text, and beyond `limit_concurrency`
`503 Service Unavailable` in plain text. It has no timeout for a request's headers or body at all (only a
keep-alive timeout between requests), so a client that sends half a request and stalls holds its connection,
and its memory, forever ("slowloris"). `OpenAIProtocol` is uvicorn's `H11Protocol` (`uvicorn.Config` takes a
protocol class for `http=`) with:

- parser errors as `{"error": {message, type, param, code}}`, saying what the parser disliked: 400, or 431 when
  the headers are too large (RFC 6585 section 5). h11 hints 501 for an unknown Transfer-Encoding (RFC 9112
  section 6.1); it is answered 400 here because it is the client's mistake, and a 5xx means a server fault;
- a header timeout: a request's headers must arrive within `header_timeout` seconds of its first byte (of the
  connection, for the first request). A partial request then gets 408 (RFC 9110 section 15.5.9, with
  `Connection: close`); a connection that sent nothing is closed silently, as at the keep-alive timeout;
- a body timeout: while a body is awaited, `body_timeout` seconds without a byte of it give 408 when no answer
  has started, and the connection closes either way (the app sees a disconnect). These are nginx's semantics
  (client_header_timeout for the whole header, client_body_timeout between two reads); a client that drips a
  byte per interval is bounded by --max-body-bytes and the connection cap;
- a connection cap: a request that arrives while more than `max_connections` connections are open gets 503 with
  `Retry-After` and `Connection: close` (uvicorn's limit_concurrency semantics, OpenAI's error shape).

One parser for every deployment: `moekit serve` always runs h11, never httptools, so that these defences and
their tests hold whatever is installed (parsing costs microseconds per request; a model step costs milliseconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from moekit.serve.errors import error_body, safe_text

log = logging.getLogger("moekit.serve")


@dataclass(frozen=True)
class HTTPLimits:
    header_timeout: float = 20.0
    body_timeout: float = 30.0
    max_connections: int = 2048
    on_error: Callable[[int], None] | None = None  # counts each error answered here (the server's metrics)


class _Connection(h11.Connection):
    """h11's connection, keeping the parser's last complaint (uvicorn drops it and says "Invalid HTTP request")."""

    error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.error = e
            raise


class OpenAIProtocol(H11Protocol):
    limits = HTTPLimits()  # set per server by protocol_class()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.conn._max_incomplete_event_size)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        app = self.app

        async def capped(scope, receive, send) -> None:
            if len(self.connections) <= self.limits.max_connections:
                return await app(scope, receive, send)
            status, body = self._error(503, f"This server has more than {self.limits.max_connections} open "
                                            "connections (--max-connections); retry later", "too_many_connections")
            self.logger.warning("more than %d open connections: answered 503", self.limits.max_connections)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                    (b"connection", b"close"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": body})

        self.app = capped

    # ---- errors ----------------------------------------------------------------------------------------
    def _error(self, status: int, message: str, code: str) -> tuple[int, bytes]:
        if self.limits.on_error is not None:
            self.limits.on_error(status)
        return status, json.dumps(error_body(status, message, code=code)).encode()

    def _write_error(self, status: int, message: str, code: str) -> None:
        """An error answer written as bytes, then close: h11 cannot send a response before it has parsed a request
        (a timed-out partial header), and after a parser error or a timed-out body the connection is finished."""
        status, body = self._error(status, message, code)
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:  # uvicorn calls it on h11.RemoteProtocolError
        err = self.conn.error
        reason = safe_text(str(err))[:200] if err is not None else "malformed request"
        if err is not None and err.error_status_hint == 431:
            self._write_error(431, f"The request headers are larger than {self.conn._max_incomplete_event_size:,}"
                                   " bytes: send fewer or shorter headers", "request_header_fields_too_large")
        else:
            self._write_error(400, f"Invalid HTTP request ({reason}): send a well-formed HTTP/1.1 request "
                                   "(RFC 9112)", "invalid_http_request")

    # ---- timeouts --------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm(data_arrived=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm(data_arrived=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self, header: bool = True, body: bool = True) -> None:
        if header and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if body and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _arm(self, data_arrived: bool) -> None:
        """Start or stop the timers for what the connection waits for now: headers (from their first byte) or
        body (restarted by every byte of it)."""
        if self.transport.is_closing():
            self._cancel_timers()
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # between requests: a new request's clock starts at its first byte
            self._cancel_timers(header=False)
            if self._header_timer is None and self.conn.trailing_data[0]:
                self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)
        elif state is h11.SEND_BODY:
            self._cancel_timers(body=data_arrived or self._body_timer is None)
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        else:  # the request is in, or the connection is done
            self._cancel_timers()

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if not self.conn.trailing_data[0]:  # nothing sent: nobody to answer
            self.transport.close()
            return
        self.logger.info("request headers incomplete after %g s: answered 408", self.limits.header_timeout)
        self._write_error(408, f"The request headers did not arrive within {self.limits.header_timeout:g} s "
                               "(--header-timeout): send the whole request at once", "request_timeout")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:  # the server stopped reading (the app is busy), not the client
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
            return
        self.logger.info("request body stalled for %g s: closing the connection", self.limits.body_timeout)
        cycle = self.cycle
        if cycle is not None:
            answer = not cycle.response_started
            cycle.disconnected = True  # the app's receive() returns http.disconnect; its answer is dropped
            cycle.message_event.set()
            if not answer:
                self.transport.close()
                return
        self._write_error(408, f"No byte of the request body arrived for {self.limits.body_timeout:g} s "
                               "(--body-timeout): send the body without pausing", "request_timeout")


def protocol_class(limits: HTTPLimits) -> type[OpenAIProtocol]:
    """`OpenAIProtocol` with these limits (uvicorn builds one protocol per connection from the class)."""
    return type("OpenAIProtocol", (OpenAIProtocol,), {"limits": limits})


def raise_open_file_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: raise the soft RLIMIT_NOFILE toward the hard one when the cap needs it
    (Go's runtime does the same at start since 1.19), or warn that accept() will fail before the cap."""
    want = max_connections + 256  # the model files, the log, the listening socket...
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            new = soft
        if new < want:
            log.warning("the open-file limit is %d: fewer than --max-connections %d connections can be open "
                        "(raise it with `ulimit -n %d`)", new, max_connections, want)


def uvicorn_config(app, cfg, **kwargs) -> uvicorn.Config:
    """uvicorn's config for `app` with cfg's (a ServeConfig) limits; kwargs go to uvicorn.Config."""
    server = getattr(getattr(app, "state", None), "server", None)  # build_app's OpenAIServer: count the errors
    on_error = (lambda status: server.metrics.errors.labels(str(status)).inc()) if server is not None else None
    limits = HTTPLimits(cfg.header_timeout, cfg.body_timeout, cfg.max_connections, on_error)
    # ws="none": the server has no websocket routes; an `Upgrade: websocket` request is then plain HTTP (a 404).
    return uvicorn.Config(app, http=protocol_class(limits), ws="none", **kwargs)

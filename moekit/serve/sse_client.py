"""A small HTTP/1.1 client on asyncio streams, for the serving benchmark: JSON in, server-sent events out.

    url = parse_url("http://127.0.0.1:8000")
    async for t, data in post_events(url, "/v1/completions", {"prompt": "hi", "stream": True}):
        print(t, data)                          # arrival time (perf_counter) and the decoded `data:` payload

Standard library only (asyncio, ssl), so `moekit bench serve` runs against any OpenAI-compatible
server without importing torch or an HTTP package. One connection per request (`Connection:
close`), as a fleet of independent clients would open; chunked and fixed-length bodies, http and
https. Each event is timestamped when its bytes arrive, which is what TTFT and ITL measure.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class URL:
    scheme: str
    host: str
    port: int
    prefix: str  # path before the endpoint, without a trailing slash

    @property
    def netloc(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def parse_url(url: str) -> URL:
    """A base URL such as http://127.0.0.1:8000 (a trailing /v1 is dropped: endpoints start with /v1)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url {url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"--url {url!r} has a bad port") from None
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/v1"):
        prefix = prefix[:-3]
    return URL(parts.scheme, parts.hostname, port, prefix)


async def _open(url: URL):
    ctx = ssl.create_default_context() if url.scheme == "https" else None
    return await asyncio.open_connection(url.host, url.port, ssl=ctx)


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection without answering")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        raise ConnectionError(f"not an HTTP response: {status_line[:80]!r}") from None
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()  # the empty line after the last chunk (no trailers expected)
                return
            yield await reader.readexactly(size)
            await reader.readline()
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while chunk := await reader.read(65536):
            yield chunk


def _request(url: URL, method: str, path: str, body: bytes, api_key: str | None) -> bytes:
    lines = [f"{method} {url.prefix}{path} HTTP/1.1", f"Host: {url.netloc}:{url.port}", "Connection: close",
             "Accept: application/json, text/event-stream", "User-Agent: moekit-bench"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _error_message(status: int, raw: bytes) -> HTTPError:
    try:
        msg = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = raw[:200].decode("utf-8", "replace")
    return HTTPError(status, msg)


async def get_json(url: URL, path: str, api_key: str | None = None) -> dict:
    reader, writer = await _open(url)
    try:
        writer.write(_request(url, "GET", path, b"", api_key))
        status, headers = await _head(reader)
        raw = b"".join([c async for c in _body(reader, headers)])
        if status != 200:
            raise _error_message(status, raw)
        return json.loads(raw)
    finally:
        writer.close()


async def post_events(url: URL, path: str, payload: dict, api_key: str | None = None
                      ) -> AsyncIterator[tuple[float, dict]]:
    """POST `payload`; yield (arrival time, JSON data) for each `data:` event until `data: [DONE]`."""
    reader, writer = await _open(url)
    try:
        writer.write(_request(url, "POST", path, json.dumps(payload).encode(), api_key))
        status, headers = await _head(reader)
        if status != 200:
            raise _error_message(status, b"".join([c async for c in _body(reader, headers)]))
        buf = b""
        async for chunk in _body(reader, headers):
            t = time.perf_counter()
            buf += chunk.replace(b"\r\n", b"\n")
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
                if not data:
                    continue  # a comment or a keep-alive
                if data == b"[DONE]":
                    return
                obj = json.loads(data)
                if isinstance(obj, dict) and obj.get("error"):
                    raise HTTPError(status, str(obj["error"].get("message", obj["error"])))
                yield t, obj
        raise ConnectionError("the stream ended without data: [DONE]")
    finally:
        writer.close()

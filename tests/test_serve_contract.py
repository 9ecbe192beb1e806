"""`moekit serve`'s contract and its defences: /openapi.json describes every route's body, chat messages carry
`refusal`, a 405 names the allowed methods, what uvicorn's HTTP parser refuses is still OpenAI-shaped, stalled
clients are answered 408 and dropped after the timeouts, and connections beyond the cap get 503.

One server subprocess (short --header-timeout/--body-timeout, so that the stalled clients are dropped within
seconds) serves the module; the connection cap is tested on an in-process server, whose open connections the
test can count. Raw sockets send what no HTTP client would.
"""

import json
import socket
import threading
import time

import pytest
from test_serve_utils import ServerProcess, request, tiny_engine, write_run

TIMEOUT = 2.0  # --header-timeout and --body-timeout of the module's server, seconds
BOUND = 30.0  # "does not hang": far above anything a working server takes on a loaded 2-core machine
OK = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_contract")
    write_run(d / "run", seed=2)
    s = ServerProcess(d / "run", d / "server.log", "--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT),
                      "--max-connections", "400")
    yield s
    assert s.stop() == 0, s.output()


def parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    """An HTTP response as bytes -> status, lower-cased headers, JSON body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    return int(lines[0].split()[1]), headers, json.loads(body)


def read_all(sock: socket.socket, timeout: float = BOUND) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not within `timeout`)."""
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        return read_all(sock)


def assert_openai_error(body: dict, status: int, words: str) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], (status, err)


# ---- the schema ---------------------------------------------------------------------------------------------------
def test_openapi_document_types_every_route(server):
    status, headers, raw_doc = request(server.port, "GET", "/openapi.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = json.loads(raw_doc)
    schemas = doc["components"]["schemas"]
    bodies = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
              "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
    for path, model in bodies.items():
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert model in schemas and op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] == (
            "#/components/schemas/ErrorResponse")
    for path in ("/v1/models", "/v1/models/{model_id}", "/health", "/metrics", "/version"):
        assert "get" in doc["paths"][path], path
    assert all("422" not in op["responses"] for ops in doc["paths"].values() for op in ops.values())
    completion, chat = schemas["CompletionRequest"]["properties"], schemas["ChatCompletionRequest"]["properties"]
    assert completion["temperature"] == {**completion["temperature"], "type": "number", "minimum": 0, "maximum": 2}
    assert completion["top_p"]["exclusiveMinimum"] == 0 and completion["top_p"]["maximum"] == 1
    assert completion["n"]["maximum"] == 128 and completion["logprobs"]["anyOf"][0]["maximum"] == 20
    assert completion["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 0}
    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert chat["messages"]["minItems"] == 1 and chat["messages"]["items"] == {"$ref": "#/components/schemas/Message"}
    assert set(schemas["Message"]["properties"]["role"]["enum"]) == {"system", "developer", "user", "assistant",
                                                                     "tool"}
    assert "refusal" in schemas["AssistantMessage"]["required"]
    status, headers, page = request(server.port, "GET", "/docs")
    assert status == 200 and b"/openapi.json" in page and headers["content-type"].startswith("text/html")


def test_chat_message_carries_a_null_refusal(server):
    status, _, body = request(server.port, "POST", "/v1/chat/completions", CHAT)
    message = json.loads(body)["choices"][0]["message"]
    assert status == 200 and "refusal" in message and message["refusal"] is None and message["role"] == "assistant"


def test_405_lists_the_allowed_methods(server):
    for method, path, allow in (("GET", "/v1/completions", "POST"), ("DELETE", "/v1/chat/completions", "POST"),
                                ("POST", "/v1/models", "GET"), ("PUT", "/v1/models/tiny", "GET")):
        status, headers, body = request(server.port, method, path)
        assert status == 405 and headers["allow"] == allow, (method, path, headers)
        assert_openai_error(json.loads(body), 405, f"this route takes {allow}")


# ---- what uvicorn's parser refuses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case, data, status, words", [
    ("bad content-length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400,
     "bad Content-Length"),
    ("two content-lengths", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2"
     b"\r\n\r\n{}", 400, "Content-Length"),
    ("malformed request line", b"GARBAGE\r\n\r\n", 400, "Invalid HTTP request"),
    ("space in the target", b"GET /v1/mo dels HTTP/1.1\r\nHost: x\r\n\r\n", 400, "Invalid HTTP request"),
    ("no Host header", b"GET /v1/models HTTP/1.1\r\n\r\n", 400, "Host"),
    ("unknown transfer-encoding", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
     400, "Transfer-Encoding"),
    # headers that never end: h11 gives up past its 16 KiB limit (complete ones that large are parsed)
    ("headers too large", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000, 431,
     "headers are larger than"),
])
def test_parser_errors_are_openai_shaped(server, case, data, status, words):
    got, headers, body = parse(raw(server.port, data))
    assert got == status and headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert_openai_error(body, status, words)
    assert body["error"]["type"] == "invalid_request_error"
    assert request(server.port, "GET", "/health")[0] == 200


# ---- slow clients -------------------------------------------------------------------------------------------------
def test_stalled_clients_are_dropped_and_do_not_block_others(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    stalled = []  # (socket, time before connecting, what it sent)
    for i in range(100):
        t0 = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", server.port))
        part = head[:30] if i % 2 == 0 else head + b'{"model": "tiny", "pro'  # half headers, half a partial body
        sock.sendall(part)
        stalled.append((sock, t0, i % 2))
    idle = socket.create_connection(("127.0.0.1", server.port))  # sends nothing at all
    t_idle = time.monotonic()
    t = time.monotonic()
    status, _, body = request(server.port, "POST", "/v1/completions", OK, {"Content-Type": "application/json"},
                              timeout=BOUND)
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")
    assert time.monotonic() - t < BOUND
    for sock, t0, has_body in stalled:
        with sock:
            got, headers, err = parse(read_all(sock))  # read until the server closes (fails after BOUND)
            closed_after = time.monotonic() - t0
        assert got == 408 and headers["connection"] == "close", (has_body, got)
        assert_openai_error(err, 408, "--body-timeout" if has_body else "--header-timeout")
        assert closed_after >= TIMEOUT - 0.05  # not before the timeout: the timer, not something else, closed it
    with idle:
        assert read_all(idle) == b"" and time.monotonic() - t_idle >= TIMEOUT - 0.05  # closed without a word
    m = server.metrics()
    assert m['moekit_request_errors_total{status="408"}'] >= 100
    assert request(server.port, "GET", "/health")[0] == 200


# ---- the connection cap -------------------------------------------------------------------------------------------
CAP = 3


@pytest.fixture(scope="module")
def capped():
    """build_app on uvicorn_config (what `moekit serve` runs), in this process, with --max-connections 3."""
    import uvicorn

    from moekit.serve.app import build_app
    from moekit.serve.config import ServeConfig
    from moekit.serve.http import uvicorn_config

    cfg = ServeConfig(model="in-process", served_model_names=["tiny"], log_interval=0, max_connections=CAP)
    app = build_app(cfg, tiny_engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn_config(app, cfg, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    deadline = time.monotonic() + BOUND
    while not srv.started or request(port, "GET", "/health")[0] != 200:
        assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
        time.sleep(0.02)
    yield srv, port
    srv.should_exit = True
    thread.join(BOUND)


def wait_connections(srv, n: int) -> None:
    deadline = time.monotonic() + BOUND
    while len(srv.server_state.connections) != n:
        assert time.monotonic() < deadline, f"{len(srv.server_state.connections)} connections open, not {n}"
        time.sleep(0.01)


def test_connections_beyond_the_cap_get_503(capped):
    srv, port = capped
    wait_connections(srv, 0)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(CAP)]
    wait_connections(srv, CAP)
    got, headers, body = parse(raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert got == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert_openai_error(body, 503, "more than 3 open connections (--max-connections)")
    for sock in held:
        sock.close()
    wait_connections(srv, 0)
    status, _, body = request(port, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"

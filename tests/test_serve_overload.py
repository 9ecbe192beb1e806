"""`moekit serve` past its capacity, and its shutdown: 429 with Retry-After for requests beyond the waiting
queue while the admitted ones complete; SIGTERM lets the request in flight finish, then exits 0.

The server runs 2 requests at once and queues 2 more (--max-num-seqs 2 --max-waiting 2). The
admitted requests are long (500 tokens), so the queue stays full while the excess requests are
refused: the test checks the order of events through /metrics, never a duration.
"""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from test_serve_utils import ServerProcess, request, write_run

LONG = 500


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_overload")
    write_run(d / "run", seed=2, max_seq_len=1024)
    s = ServerProcess(d / "run", d / "server.log", "--max-num-seqs", "2", "--max-waiting", "2")
    yield s
    assert s.stop() == 0, s.output()


def stream_all(client: openai.OpenAI, max_tokens: int, started: threading.Event | None = None) -> tuple[str, int, str]:
    stream = client.completions.create(model="tiny", prompt="x", max_tokens=max_tokens, temperature=1.0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, reason, usage = "", None, None
    for chunk in stream:
        if started is not None:
            started.set()
        if chunk.choices:
            text, reason = text + chunk.choices[0].text, chunk.choices[0].finish_reason
        else:
            usage = chunk.usage
    return text, usage.completion_tokens, reason


def wait_for(server: ServerProcess, running: int, waiting: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m["moekit_num_requests_running"], m["moekit_num_requests_waiting"]) == (running, waiting):
            return
        assert time.monotonic() < deadline, f"expected {running} running and {waiting} waiting: {m}"
        time.sleep(0.02)


def test_excess_requests_get_429_while_admitted_ones_complete(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=120)
    with ThreadPoolExecutor(4) as pool:
        admitted = [pool.submit(stream_all, client, LONG) for _ in range(4)]
        wait_for(server, running=2, waiting=2)
        for _ in range(6):
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model="tiny", prompt="y", max_tokens=4)
            assert e.value.response.headers["retry-after"] == "1"
            assert (e.value.type, e.value.code, e.value.param) == ("rate_limit_error", "rate_limit_exceeded", None)
            assert "at capacity: 2 requests running and 2 waiting (--max-waiting 2)" in e.value.message
        m = server.metrics()  # refused at once: the admitted requests are all still there
        assert (m["moekit_num_requests_running"], m["moekit_num_requests_waiting"]) == (2, 2)
        results = [f.result() for f in admitted]
    assert all(n == LONG and reason == "length" and len(text) <= LONG for text, n, reason in results)
    assert server.metrics()['moekit_request_errors_total{status="429"}'] == 6
    with pytest.raises(openai.BadRequestError, match="more than this server holds at once"):
        client.completions.create(model="tiny", prompt="y", max_tokens=4, n=5)  # 5 > 2 running + 2 waiting
    assert client.completions.create(model="tiny", prompt="y", max_tokens=4, n=4).usage.completion_tokens >= 4


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=120)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(stream_all, client, 200, started)
        assert started.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        text, n, reason = fut.result()
    assert n == 200 and reason == "length"
    assert server.proc.wait(60) == 0
    log = server.output()
    assert "draining: 1 requests in flight" in log and "moekit serve: stopped" in log
    with pytest.raises(OSError):
        request(server.port, "GET", "/health", timeout=5)


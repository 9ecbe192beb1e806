"""`moekit serve`'s command line (bad flags: one line, exit 2; a model that fails to load: exit 1) and the
server's life cycle in process: 503 while the model loads, 503 for new requests while draining
(the request in flight still finishes), and an engine that raises fails its requests and the server.
"""

import json
import socket
import threading

import openai
import pytest
import torch
from test_serve_utils import InProcessServer, request, tiny_engine, write_run

from moekit.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_cli") / "run"
    write_run(d)
    return d


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/run"], "is not a folder"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--max-waiting", "-1"], "--max-waiting must be >= 0"),
    (["--max-n", "500"], "--max-n must be <= 128"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be >= 1"),
    (["--api-key", ""], "--api-key is empty"),
    (["--draft", "RUN", "--ngram"], "choose one"),
    (["--kv-cache-gb", "0"], "--kv-cache-gb must be > 0"),
    (["--chat-template", "no_such_template.jinja"], "no such file"),
    (["--chat-template", "{% for %}"], "does not compile"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--n_layer=3"], "takes no model overrides"),
    (["--port", "BUSY"], "cannot listen on 127.0.0.1:"),
])
def test_bad_flags_are_one_line_and_exit_2(run_dir, capsys, argv, message):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    argv = [str(run_dir) if a == "RUN" else str(busy.getsockname()[1]) if a == "BUSY" else a for a in argv]
    try:
        code = main(["serve", *(["--model", str(run_dir)] if argv[0] != "--model" else []), *argv])
    finally:
        busy.close()
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_model_that_fails_to_load_exits_1(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    (run / "model.safetensors").unlink()  # config.json is there, the weights are not
    code = main(["serve", "--model", str(run), "--port", "0", "--log-interval", "0", "--no-access-log"])
    err = capsys.readouterr().err
    assert code == 1
    assert "moekit: error: loading the model failed:" in err and "has no readable model.safetensors" in err


def test_503_while_loading_then_ready_then_503_while_draining():
    gate = threading.Event()

    def load():
        assert gate.wait(60)
        return tiny_engine()

    with InProcessServer(load) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="hi")
        assert e.value.status_code == 503 and "the model is still loading" in e.value.message
        assert int(e.value.response.headers["retry-after"]) > 0
        status, _, body = request(s.port, "GET", "/health")
        assert status == 503 and json.loads(body)["error"]["code"] == "service_unavailable"
        assert "moekit_server_ready 0.0" in request(s.port, "GET", "/metrics")[2].decode()

        gate.set()
        s.wait_ready()
        stream = client.completions.create(model="tiny", prompt="hi", max_tokens=30, stream=True,
                                           extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        chunks = [next(stream)]
        s.openai_server.drain()  # what SIGTERM does first
        with pytest.raises(openai.InternalServerError, match="the server is shutting down"):
            client.completions.create(model="tiny", prompt="hi", max_tokens=3)
        assert request(s.port, "GET", "/health")[0] == 503
        chunks += list(stream)
        assert chunks[-1].usage.completion_tokens == 30 and chunks[-2].choices[0].finish_reason == "length"


def test_a_drain_that_times_out_ends_the_stream_with_an_error_event():
    with InProcessServer(lambda: tiny_engine(max_seq_len=8192), drain_timeout=0.2) as s:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0, timeout=60)
        stream = client.completions.create(model="tiny", prompt="hi", max_tokens=8000, stream=True,
                                           extra_body={"ignore_eos": True})
        next(stream)
        s.openai_server.drain()
        s.server.should_exit = True  # what uvicorn does on SIGTERM, after the drain; 0.2 s later it cancels
        with pytest.raises(openai.APIError, match="cancelled: the server is shutting down"):
            for _ in stream:
                pass
        s.thread.join(30)
        engine = s.openai_server.engine
        assert engine.state == "stopped" and not engine.engine.has_unfinished()
        engine.engine.check_idle()  # every KV block back in the pool


def test_an_engine_that_raises_fails_its_requests_and_the_server():
    def load():
        engine = tiny_engine()
        real, calls = engine.step, []

        def step():
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real()

        engine.step = step
        return engine

    with InProcessServer(load) as s:
        s.wait_ready()
        fatal = threading.Event()
        s.openai_server.engine.on_fatal = fatal.set  # `moekit serve` stops uvicorn here (exit 1)
        client = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError, match="illegal memory access") as e:
            client.completions.create(model="tiny", prompt="hi", max_tokens=50, extra_body={"ignore_eos": True})
        assert e.value.status_code == 500
        assert fatal.wait(10)
        with pytest.raises(openai.InternalServerError, match="the engine failed") as e:
            client.completions.create(model="tiny", prompt="hi", max_tokens=5)
        assert e.value.status_code == 503 and request(s.port, "GET", "/health")[0] == 503


def test_loader_builds_draft_int8_engines_and_checks_the_draft_vocabulary(tmp_path):
    from moekit.infer.sampler import SamplingParams
    from moekit.serve.cli import engine_loader
    from moekit.serve.config import ServeConfig

    write_run(tmp_path / "target", seed=1)
    write_run(tmp_path / "draft", seed=2)
    engine = engine_loader(ServeConfig(model=str(tmp_path / "target"), draft=str(tmp_path / "draft"),
                                       quantize="int8", kv_cache_gb=0.01, device="cpu"))()
    # ignore_eos: a sampled <|endoftext|> as the first token would end the request before any draft.
    out = engine.generate(["hello"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and engine.metrics()["spec_drafted"] > 0
    (tmp_path / "draft" / "tokenizer.json").write_text((tmp_path / "draft" / "tokenizer.json").read_text()
                                                       .replace('"a":', '"ä":'))
    with pytest.raises(ValueError, match="does not use the tokenizer of --model"):
        engine_loader(ServeConfig(model=str(tmp_path / "target"), draft=str(tmp_path / "draft"), device="cpu"))()


def test_metrics_count_speculation_prefix_hits_experts_and_latencies():
    from test_serve_utils import parse_metrics

    with InProcessServer(lambda: tiny_engine(ngram=True, num_spec_tokens=3)) as s:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0)
        prompt = "abcabcabcabcabcabcabcabcabcabcabcabc"  # 37 tokens: two full 16-token blocks to share
        for _ in range(2):
            client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        m = parse_metrics(request(s.port, "GET", "/metrics")[2].decode())
    assert m["moekit_spec_decode_num_draft_tokens_total"] > 0
    assert 0 <= m["moekit_spec_decode_num_accepted_tokens_total"] <= m["moekit_spec_decode_num_draft_tokens_total"]
    assert m["moekit_prefix_cache_hits_total"] == 32 and m["moekit_prefix_cache_hit_rate"] > 0  # the 2nd request
    experts = {k: v for k, v in m.items() if k.startswith("moekit_expert_tokens_total")}
    assert len(experts) == 4 and sum(experts.values()) == 2 * m["moekit_computed_tokens_total"]  # top-2 of 4
    assert m["moekit_time_to_first_token_seconds_count"] == m["moekit_e2e_request_latency_seconds_count"] == 2
    assert m["moekit_request_queue_time_seconds_count"] == 2 and m["moekit_generation_tokens_total"] == 24
    assert m["moekit_time_per_output_token_seconds_count"] == 2 and m["moekit_inter_token_latency_seconds_count"] > 0
    assert m['moekit_request_success_total{finished_reason="length"}'] == 2

"""`moekit serve` through the official `openai` client: completions and chat, streaming or not, stop, n,
seeds, logprobs, echo, usage, models, and every error as the matching `openai` exception class.

One server subprocess (with an API key) serves the whole module; greedy outputs are checked
against full recomputation with the model the test wrote (conftest.greedy_reference).
"""

import json

import openai
import pytest
import torch
from conftest import greedy_reference
from test_serve_utils import API_KEY, ServerProcess, ascii_tokenizer, encode, request, write_run

from moekit.serve.chat import ChatTemplate, render_default

PROMPT = "def main(args):\n    "


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_api")
    model = write_run(d / "run", seed=3)
    server = ServerProcess(d / "run", d / "server.log", "--api-key", API_KEY)
    yield model, server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].base_url, api_key=API_KEY, max_retries=0, timeout=60)


def reference(model, prompt: str, n: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of greedy decoding by full recomputation."""
    ids = greedy_reference(model, encode(prompt), n, eos=0)
    reason = "stop" if ids and ids[-1] == 0 else "length"
    return ascii_tokenizer().decode(ids, skip_special_tokens=True), reason, len(ids)


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].object == "model"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_greedy_completion_equals_full_recomputation_with_usage(served, client):
    model, _ = served
    text, reason, n = reference(model, PROMPT, 12)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(encode(PROMPT)) and r.usage.completion_tokens == n
    assert r.usage.total_tokens == r.usage.prompt_tokens + n


def test_streaming_gives_the_same_text_and_usage(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    body, last = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1]) and all(c.usage is None for c in body)
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_renders_the_default_template(served, client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    prompt = render_default(messages)
    assert prompt == "System: You are terse.\n\nUser: Hi there\n\nAssistant:"
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stop=["\n\nUser:"])
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].finish_reason == plain.choices[0].finish_reason
    assert chat.usage.prompt_tokens == len(encode(prompt)) == plain.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stop_string_cuts_the_text_streaming_or_not(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    assert len(full) >= 10, "pick another prompt: this one stops too early to test stop strings"
    stop = full[6:9]
    cut = full[:full.index(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "\x00"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"


def test_n_choices_with_a_seed_are_reproducible(client):
    def texts(seed):
        r = client.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, n=3, seed=seed)
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.text for c in r.choices]

    first = texts(7)
    assert texts(7) == first
    assert len(set(first)) > 1  # the choices are drawn with seeds 7, 8, 9
    assert texts(8) != first
    chat = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                           seed=5, temperature=1.0).choices[0].message.content for _ in range(2)]
    assert chat[0] == chat[1]


def test_completion_logprobs_are_the_models_log_softmax(served, client):
    model, _ = served
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    with torch.no_grad():
        expected = model(torch.tensor([encode(PROMPT)])).logits[0, -1].float().log_softmax(-1).max().item()
    assert lp.token_logprobs[0] == pytest.approx(expected, abs=1e-4)
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(val) and top[tok] == pytest.approx(val)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_with_top_alternatives(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def test_batched_prompts_echo_and_token_id_prompts(client):
    r = client.completions.create(model="tiny", prompt=["ab", "cd"], n=2, max_tokens=3, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith(["ab", "cd"][c.index // 2]) for c in r.choices)
    assert r.usage.prompt_tokens == len(encode("ab")) + len(encode("cd"))
    as_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    as_ids = client.completions.create(model="tiny", prompt=encode(PROMPT), max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text


def test_errors_arrive_as_the_matching_openai_exceptions(served, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", temperature=-1)
    assert e.value.param == "temperature" and e.value.type == "invalid_request_error"
    assert "temperature must be a number in [0, 2], got -1" in e.value.message
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens") as e:
        client.completions.create(model="tiny", prompt="x" * 500)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist") as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError, match="Unknown route POST /v1/embeddings"):
        client.embeddings.create(model="tiny", input="hi")
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="a" * 10_000_000)
    assert e.value.status_code == 413 and "at most 8,388,608" in e.value.message
    wrong = openai.OpenAI(base_url=served[1].base_url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key") as e:
        wrong.models.list()
    assert e.value.code == "invalid_api_key"


def test_key_is_required_on_v1_only(served):
    port = served[1].port
    status, _, body = request(port, "GET", "/v1/models")
    assert status == 401 and json.loads(body)["error"]["message"].startswith("Missing API key")
    assert request(port, "GET", "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200
    assert request(port, "GET", "/v1/models", headers={"Authorization": f"Basic {API_KEY}"})[0] == 401
    assert request(port, "GET", "/health")[0] == 200 and request(port, "GET", "/metrics")[0] == 200


def test_stream_wire_format_is_server_sent_events_ending_in_done(served):
    # Greedy, so the token count is the reference's (a sampled run may draw <|endoftext|> early).
    _, _, n = reference(served[0], PROMPT, 6)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    status, headers, raw = request(served[1].port, "POST", "/v1/completions", body,
                                   {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == n
    assert {c["id"] for c in chunks} == {headers["x-request-id"]}


@torch.no_grad()
def prompt_logprob_oracle(model, ids: list[int]) -> list[float]:
    """Each prompt token's logprob given the ones before it, from one forward pass over the whole prompt."""
    lp_TV = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(lp_TV[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_echo_with_logprobs_scores_the_prompt_as_loglikelihood_evaluation_does(served, client):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs=1, max_tokens=1 (or 0), token ids as the prompt;
    it reads token_logprobs[ctxlen:-1]. Every value equals a full forward pass; a cached prefix is recomputed."""
    model, _ = served
    prompt = PROMPT * 6  # several 16-token blocks: a cache hit would be possible
    ids = encode(prompt)
    want = prompt_logprob_oracle(model, ids)
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=2, temperature=0)  # caches the blocks
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:len(ids)], want, strict=True)) < 1e-5
    text = r.choices[0].text
    assert lp.text_offset[:2] == [0, 0]  # <|endoftext|> is a token of the prompt but not of the echoed text
    for tok, off in zip(lp.tokens[1:], lp.text_offset[1:], strict=True):  # each offset points at its token's text
        assert text[off:off + len(tok)] == tok
    assert r.choices[0].text == prompt + plain.choices[0].text[:len(r.choices[0].text) - len(prompt)]
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # recomputed: the cache holds K/V, not logits
    again = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16  # the blocks are still there for others

    none = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=3)
    c = none.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and none.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[1:] == lp.token_logprobs[1:len(ids)]
    assert all(len(t) >= 3 for t in c.logprobs.top_logprobs[1:])

    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, echo=True,
                                            logprobs=1, stream=True))
    whole = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, echo=True, logprobs=1)
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    streamed = [v for ch in chunks if ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs


def test_tokenize_and_detokenize_as_vllm_defines_them(served, client):
    port, auth = served[1].port, {"Authorization": f"Bearer {API_KEY}"}

    def post(path: str, body: dict) -> tuple[int, dict]:
        status, _, data = request(port, "POST", path, body, auth)
        return status, json.loads(data)

    status, tok = post("/tokenize", {"model": "tiny", "prompt": PROMPT, "return_token_strs": True})
    assert status == 200 and tok["tokens"] == encode(PROMPT) and tok["count"] == len(encode(PROMPT))
    assert tok["max_model_len"] == 128 and "".join(tok["token_strs"][1:]) == PROMPT
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1)
    assert r.usage.prompt_tokens == tok["count"]  # the count is what the endpoint feeds the model
    status, bare = post("/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert status == 200 and bare["tokens"] == encode(PROMPT)[1:] and bare["token_strs"] is None
    messages = [{"role": "user", "content": "Hi there"}]
    status, chat = post("/tokenize", {"messages": messages})
    assert status == 200
    assert chat["count"] == client.chat.completions.create(model="tiny", messages=messages,
                                                           max_tokens=1).usage.prompt_tokens
    status, _, raw = request(port, "GET", "/tokenizer_info", None, auth)
    info = json.loads(raw)
    assert status == 200 and info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert ChatTemplate(info["chat_template"]).render(messages) == render_default(messages)  # renders as we do
    status, back = post("/detokenize", {"model": "tiny", "tokens": tok["tokens"]})
    assert status == 200 and back["prompt"] == "<|endoftext|>" + PROMPT  # special tokens kept, as in vLLM

    for path, body, param, words in [
            ("/tokenize", {"prompt": "x", "messages": messages}, "prompt", "exactly one of prompt"),
            ("/tokenize", {"prompt": 5}, "prompt", "prompt must be a string"),
            ("/tokenize", {"model": "gpt-4", "prompt": "x"}, "model", "does not exist"),
            ("/detokenize", {"tokens": [1, 100000]}, "tokens", "not a token id"),
            ("/detokenize", {"tokens": "abc"}, "tokens", "tokens must be an array")]:
        status, err = post(path, body)
        assert status in (400, 404) and err["error"]["param"] == param and words in err["error"]["message"], err

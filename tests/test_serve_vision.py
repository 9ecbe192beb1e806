"""A vision model behind `moekit serve`, driven by the official openai client: an image sent as a data URL gets the
answer full recomputation gives (streamed and not), every bad image is a 400 and the server stays up, and the
encoder cache and KV blocks are free afterwards."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import torch
from conftest import save_run
from PIL import Image
from test_images import forged_png
from test_serve_utils import ServerProcess, ascii_tokenizer, encode
from test_vision_model import open_gates

from moekit.config import ModelConfig
from moekit.images import decode_image, to_pixels
from moekit.model.transformer import Transformer
from moekit.model.vision import VisionInput, image_index

MARK = 97  # `<image>`: the special token after the 97 ASCII tokens
CFG = ModelConfig(name="tiny", vocab_size=98, n_layer=2, d_model=32, n_head=4, n_kv_head=1, d_ff=48, n_expert=4,
                  top_k=2, moe_every=2, mlp="swiglu", max_seq_len=128, tie_embeddings=True,
                  vision=dict(image_size=16, patch_size=4, d_model=32, n_head=4, d_ff=64, n_latents=4,
                              image_token_id=MARK, max_images=4))


def png(seed: int, size=(24, 20), fmt="PNG") -> bytes:
    img = Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def ask(data_url: str, question: str = "what is it?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_vision")
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    model.init_weights(4)
    open_gates(model, 2.0)  # random weights with open gates: the picture changes the answer
    tok = ascii_tokenizer()
    tok.add_special_tokens(["<image>"])
    assert tok.token_to_id("<image>") == MARK
    save_run(d / "run", model, tok)
    server = ServerProcess(d / "run", d / "server.log")
    yield model, server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].base_url, api_key="none", max_retries=0, timeout=60)


@torch.no_grad()
def reference(model, image: bytes, question: str, n: int) -> str:
    """The default chat template's prompt, the image's marker where its part was; greedy by full recomputation."""
    ids = encode("User: ") + [MARK] + encode("\n" + question + "\n\nAssistant:")[1:]
    visual = model.encode_images(to_pixels(decode_image(image), 16)[None])
    out = []
    for _ in range(n):
        x = torch.tensor([ids])
        tok = int(model(x, vision=VisionInput(image_index(x, MARK), visual_ILD=visual)).logits[0, -1].argmax())
        if tok == 0:
            break
        out.append(tok)
        ids.append(tok)
    return ascii_tokenizer().decode(out)


def test_the_openai_client_sends_an_image_and_gets_the_answer(served, client):
    model, server = served
    answers, logprobs = {}, {}
    for seed in (1, 2):
        r = client.chat.completions.create(model="tiny", messages=ask(url(png(seed))), max_tokens=12, temperature=0,
                                           logprobs=True)
        assert r.choices[0].message.content == reference(model, png(seed), "what is it?", 12)
        assert r.usage.prompt_tokens == len(encode("User: ")) + 1 + len(encode("\nwhat is it?\n\nAssistant:")) - 1
        answers[seed] = r.choices[0].message.content
        logprobs[seed] = [t.logprob for t in r.choices[0].logprobs.content]
    assert logprobs[1] != logprobs[2]  # the picture is read
    stream = client.chat.completions.create(model="tiny", messages=ask(url(png(1))), max_tokens=12, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answers[1]
    jpeg = client.chat.completions.create(model="tiny", messages=ask(url(png(1, fmt="JPEG"), "image/jpeg")),
                                          max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert jpeg.choices[0].finish_reason == "length"
    cards = {m.id: m for m in client.models.list().data}
    assert cards["tiny"].model_extra["input_modalities"] == ["text", "image"]
    m = server.wait_idle()
    assert m["moekit_encoder_cache_requests"] == 0 and m["moekit_kv_cache_blocks_used"] == 0
    assert m["moekit_images_encoded_total"] == 4


BAD = [
    ("not an image", url(b"hello, world", "image/png"), "not an image"),
    ("truncated", url(png(3)[:60]), "truncated or corrupt"),
    ("bomb", url(forged_png(20_000, 20_000)), "the limit is 16,777,216 pixels"),
    ("http", "https://example.com/cat.png", "data URL"),
    ("format", None, "TIFF"),
]


@pytest.mark.parametrize("name,data_url,message", BAD, ids=[b[0] for b in BAD])
def test_bad_images_are_400s_and_the_server_stays_up(served, client, name, data_url, message):
    if data_url is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "TIFF")
        data_url = url(buf.getvalue(), "image/tiff")
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="tiny", messages=ask(data_url), max_tokens=2)
    # ignore_eos: the random model may sample its end token within 2 tokens; "length" proves the request ran
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                        extra_body={"ignore_eos": True})
    assert ok.choices[0].finish_reason == "length"


def test_too_many_images_in_one_message_is_a_400_with_the_limit(client):
    parts = [{"type": "image_url", "image_url": {"url": url(png(0))}} for _ in range(100)]
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=2)

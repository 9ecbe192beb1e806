"""Images in chat requests (moekit/serve/vision_parts.py, protocol.py): image_url parts become `<image>` markers
and pixels in order; every bad image, an image for a text-only model, too many images and a literal marker
are a 400 in OpenAI's shape whose `param` points at the part; /v1/models says which models take images.

Function-level tests call protocol.parse_* with Limits with and without a VisionConfig; the server tests run
the app in-process (test_serve_utils.InProcessServer) over the tiny text model with a vision config swapped
in, and record what the app hands the AsyncEngine (the engine side is tested in test_vision_engine.py)."""

from __future__ import annotations

import base64
import dataclasses
import io
import re

import numpy as np
import openai
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from test_images import forged_png
from test_serve_utils import InProcessServer, ascii_tokenizer, request, tiny_engine

from moekit.config import VisionConfig
from moekit.images import decode_image, pixels_hash, to_pixels
from moekit.serve import protocol, vision_parts
from moekit.serve.app import OpenAIServer
from moekit.serve.errors import APIError

MARK = 96  # the marker id of the function-level vision model (any id of its vocabulary)
VISION = VisionConfig(image_size=16, patch_size=8, max_images=3, image_token_id=MARK)
TEXT_LIMITS = protocol.Limits(("tiny",), 97, 128, 4)
VISION_LIMITS = dataclasses.replace(TEXT_LIMITS, vision=VISION)


def png(seed: int = 0, size: tuple[int, int] = (20, 12), fmt: str = "PNG") -> bytes:
    img = Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image(u: str, **kw) -> dict:
    return {"type": "image_url", "image_url": {"url": u, **kw}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def chat(limits, *contents, role: str = "user") -> protocol.GenerateRequest:
    return protocol.parse_chat({"model": "tiny", "messages": [{"role": role, "content": c} for c in contents]}, limits)


def refused(fn, *args, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args, **kw)
    assert e.value.status == 400 and e.value.body()["error"]["type"] == "invalid_request_error"
    return e.value


# ---- function level ----------------------------------------------------------------------------------
def test_image_parts_become_markers_and_pixels_in_order():
    req = chat(VISION_LIMITS, [text("compare"), image(url(png(1)), detail="low"), text("with"),
                               {"type": "image_url", "image_url": url(png(2, fmt="WEBP"), "image/webp")}],
               [image(url(png(3)), detail="auto")])
    assert [m["content"] for m in req.messages] == ["compare\n<image>\nwith\n<image>", "<image>"]
    assert len(req.images) == 3 and all(px.shape == (3, 16, 16) and px.dtype == torch.float32 for px in req.images)
    expected = [to_pixels(decode_image(png(s, fmt=f)), 16) for s, f in ((1, "PNG"), (2, "WEBP"), (3, "PNG"))]
    assert [pixels_hash(px) for px in req.images] == [pixels_hash(px) for px in expected]
    # No image, no pixels; a text-only model's text is unchanged, a literal <image> included (it is plain text there)
    assert chat(VISION_LIMITS, "hi").images == [] and chat(TEXT_LIMITS, [text("a"), text("b")]).images == []
    assert chat(TEXT_LIMITS, "draw an <image> tag").messages[0]["content"] == "draw an <image> tag"


def test_a_text_only_model_refuses_image_parts_and_unknown_parts_keep_their_error():
    e = refused(chat, TEXT_LIMITS, [text("what is it?"), image(url(png()))])
    assert e.param == "messages[0].content[1].image_url" and "model `tiny` does not take images" in e.message
    e = refused(chat, TEXT_LIMITS, [{"type": "input_audio", "input_audio": {}}])
    assert e.param == "messages[0].content[0]"
    assert e.message == ('messages[0].content[0] must be a text part {"type": "text", "text": ...}; "input_audio" '
                         "parts are not supported (this model reads text)")
    e = refused(chat, VISION_LIMITS, "ok", ["not a part"])
    assert e.param == "messages[1].content[0]" and "or an image part" in e.message
    assert "this is not supported" in e.message
    e = refused(chat, VISION_LIMITS, [{"type": "text", "text": 3}])
    assert e.param == "messages[0].content[0].text"


@pytest.mark.parametrize("part,message", [
    (image("https://example.com/cat.png"), "this server fetches nothing.*base64 data URL"),
    (image(url(b"hello", "text/plain")), "'text/plain' is not an image"),
    (image(url(b"\x00\x01 definitely not a picture " * 20)), "not an image"),
    (image(url(png(0, (64, 64))[:300])), "truncated or corrupt"),
    (image(url(forged_png(20000, 20000))), "the limit is 16,777,216 pixels"),
    (image(url(png(fmt="TIFF"), "image/tiff")), "format TIFF is not supported"),
    (image("data:image/png;base64,***"), "not valid base64"),
    ({"type": "image_url", "image_url": 42}, "must be an object"),
    ({"type": "image_url"}, "must be an object"),
    ({"type": "image_url", "image_url": {"detail": "auto"}}, "must be a string"),
])
def test_bad_images_are_400s_pointing_at_the_part(part, message):
    e = refused(chat, VISION_LIMITS, "first", [text("look:"), part])
    assert e.param == "messages[1].content[1].image_url"
    assert e.message.startswith("messages[1].content[1].image_url") and re.search(message, e.message), e.message


def test_detail_must_be_one_of_openais_values():
    e = refused(chat, VISION_LIMITS, [image(url(png()), detail="ultra")])
    assert e.param == "messages[0].content[0].image_url.detail" and "auto, low, high" in e.message


def test_too_many_images_are_refused_before_any_is_decoded(monkeypatch):
    def no_decoding(data):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(vision_parts, "decode_image", no_decoding)
    e = refused(chat, VISION_LIMITS, [image(url(png()))], [text("and")] + [image(url(png()))] * 3)
    assert "4 images" in e.message and "at most 3 per request" in e.message
    assert e.param == "messages[1].content[3]"  # the first image over the limit


@pytest.mark.parametrize("contents,param", [
    (["see <image> here"], "messages[0].content"),
    ([[text("ok"), text("an <image>")]], "messages[0].content[1].text"),
    (["fine", [image(url(png())), text("<image>")]], "messages[1].content[1].text"),
])
def test_a_literal_image_marker_in_text_is_refused_for_a_vision_model(contents, param):
    e = refused(chat, VISION_LIMITS, *contents)
    assert e.param == param and "reads as an image marker" in e.message and "image_url" in e.message
    e = refused(chat, VISION_LIMITS, "you are <image>", role="system")  # any role: the template renders them all
    assert e.param == "messages[0].content"


def test_completions_take_no_images():
    body = {"model": "tiny", "max_tokens": 2}
    for prompt in ("<image> what is this?", ["fine", "an <image>"], [5, MARK, 7], [[5], [MARK]]):
        e = refused(protocol.parse_completion, {**body, "prompt": prompt}, VISION_LIMITS)
        assert e.param == "prompt" and "/v1/chat/completions" in e.message and "image_url" in e.message
    assert protocol.parse_completion({**body, "prompt": [5, MARK]}, TEXT_LIMITS).prompts == [[5, MARK]]
    assert protocol.parse_completion({**body, "prompt": "a <image>"}, TEXT_LIMITS).prompts == ["a <image>"]
    assert protocol.parse_completion({**body, "prompt": "plain"}, VISION_LIMITS).prompts == ["plain"]


def test_marker_tokens_must_match_the_images():
    px = to_pixels(decode_image(png()), 16)
    OpenAIServer._check_markers([[1, MARK, 2]], [px], VISION)  # one marker, one image: fine
    for ids, images in (([1, 2], [px]), ([MARK, MARK], [px]), ([MARK], [])):
        with pytest.raises(APIError, match="image marker tokens.*fix the model folder") as e:
            OpenAIServer._check_markers([ids], images, VISION)
        assert e.value.status == 500
    with pytest.raises(APIError, match="image_token_id is -1"):
        OpenAIServer._check_markers([[1]], [px], dataclasses.replace(VISION, image_token_id=-1))


# ---- through the app ---------------------------------------------------------------------------------
def vision_engine():
    """The tiny text model with `<image>` (id 97) in its tokenizer and a vision config on the engine: enough
    for the server's parsing, tokenization and /v1/models (no request with images reaches this engine)."""
    from moekit.infer.engine import Engine
    from moekit.infer.tokenizer import TextCodec

    tok = ascii_tokenizer()
    tok.add_special_tokens(["<image>"])
    codec = TextCodec(tok, prefix_ids=(0,), eos_token_ids=(0,), add_special_tokens=False)
    engine = Engine(tiny_model(0, vocab_size=98, tie_embeddings=True), codec, num_blocks=64, block_size=16)
    engine.cfg = dataclasses.replace(engine.cfg, vision=dataclasses.replace(VISION, image_token_id=97))
    return engine


def test_models_say_which_take_images():
    with InProcessServer(tiny_engine) as s:
        s.wait_ready()
        card = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0).models.retrieve("tiny")
        assert card.input_modalities == ["text"] and not hasattr(card, "max_images")
        status, _, body = request(s.port, "POST", "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": [image(url(png()))]}]})
        assert status == 400 and b"does not take images" in body


def test_a_chat_request_with_an_image_through_the_server():
    with InProcessServer(vision_engine) as s:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0)
        card = client.models.list().data[0]
        assert card.input_modalities == ["text", "image"] and card.max_images == 3
        seen = []
        submit = s.openai_server.engine.submit

        async def recording_submit(items, prefix, images=()):
            # What the AsyncEngine must pass on: engine.add_request(ids, params, rid, images=images) for each item.
            seen.append((items, images))
            return await submit([([t if t != 97 else 1 for t in ids], p) for ids, p in items], prefix)

        s.openai_server.engine.submit = recording_submit
        r = client.chat.completions.create(model="tiny", max_tokens=2, n=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "what?"},
                                         {"type": "image_url", "image_url": {"url": url(png(4))}}]}])
        assert len(r.choices) == 2
        (items, images), = seen
        enc = ascii_tokenizer().encode  # the default template: "User: what?\n<image>\n\nAssistant:"
        expected = [0] + enc("User: what?\n").ids + [97] + enc("\n\nAssistant:").ids
        assert [ids for ids, _ in items] == [expected, expected]  # n = 2 choices, each with the image
        assert len(images) == 1 and torch.equal(images[0], to_pixels(decode_image(png(4)), 16))
        big = png(5, (200, 200))  # a body over 64 KiB is parsed (its images decoded) off the event loop
        assert len(big) > 100_000
        client.chat.completions.create(model="tiny", max_tokens=1, messages=[
            {"role": "user", "content": [image(url(big)), text("and?")]}])
        assert len(seen) == 2 and torch.equal(seen[1][1][0], to_pixels(decode_image(big), 16))
        with pytest.raises(openai.BadRequestError, match="takes at most 3 per request") as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
                image(url(png()))] * 4}])
        assert e.value.param == "messages[0].content[3]"
        with pytest.raises(openai.BadRequestError, match="/v1/completions takes no images") as e:
            client.completions.create(model="tiny", prompt="<image> hi", max_tokens=1)
        assert len(seen) == 2  # neither bad request reached the engine

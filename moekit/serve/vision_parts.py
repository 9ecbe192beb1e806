"""Images in chat messages: `image_url` content parts -> `<image>` markers in the text + checked pixel tensors.

OpenAI's Chat Completions format (API reference, "Image input"; vLLM accepts the same, and the
string form too, which some clients send):

    {"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO...", "detail": "auto"}}]}
    {"type": "image_url", "image_url": "data:image/png;base64,iVBO..."}

Each image part becomes the marker text `<image>` at its place in the message (parts are joined
with newlines, as text parts are), and its pixels, `moekit.images.to_pixels(decode_image(...),
vision.image_size)`, are appended in order: marker k of the rendered prompt is image k. The
tokenizer of a vision model reads `<image>` as `vision.image_token_id` (SPEC section 5, Flamingo's
masking: text attends to the image of the last marker before it).

A user's own text that contains `<image>` is refused, not escaped: the marker is a special token, so
the text would add a marker without an image and shift every later image onto the wrong place,
and any escape (a zero-width space, say) would silently change what the model reads. Only URLs
that carry their data (base64 data URLs) are accepted: the server fetches nothing.

    parser = ContentParser(vision, model="tiny")        # vision: the model's VisionConfig, or None
    text = parser.content(parts, "messages[0].content")  # "What is in this picture?\n<image>"
    parser.images                                       # [(3, S, S) float32 tensors], one per marker
"""

from __future__ import annotations

from moekit.config import VisionConfig
from moekit.images import ImageError, decode_data_url, decode_image, to_pixels
from moekit.serve.errors import bad_request, show

IMAGE_MARKER = "<image>"
DETAILS = ("auto", "low", "high")  # OpenAI's values; every image is resized to vision.image_size whatever it says


def count_image_parts(messages: list) -> list[str]:
    """The `param` of every image part of a messages array, in order (a cheap pass before any decoding)."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            out += [f"messages[{i}].content[{j}]" for j, part in enumerate(content)
                    if isinstance(part, dict) and part.get("type") == "image_url"]
    return out


def check_no_marker(text: str, param: str, vision: VisionConfig | None) -> str:
    """`text` unchanged, or a 400 if a vision model would read a literal `<image>` in it as an image marker."""
    if vision is not None and IMAGE_MARKER in text:
        raise bad_request(f"{param} contains the text {IMAGE_MARKER}, which this model reads as an image marker "
                          "(without an image it would put the next images in the wrong place): remove it or "
                          "write it differently, and send images as image_url content parts", param)
    return text


class ContentParser:
    """Parses the content arrays of one request; collects the pixels of its images in order."""

    def __init__(self, vision: VisionConfig | None, model: str):
        self.vision, self.model = vision, model
        self.images: list = []

    def content(self, parts: list, param: str) -> str:
        """The message text of a content array: text parts and `<image>` markers joined with newlines."""
        return "\n".join(self._part(part, f"{param}[{j}]") for j, part in enumerate(parts))

    def _part(self, part, param: str) -> str:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{param}.text must be a string, got {show(part.get('text'))}", f"{param}.text")
            return check_no_marker(part["text"], f"{param}.text", self.vision)
        if kind == "image_url":
            self.images.append(self._image(part, f"{param}.image_url"))
            return IMAGE_MARKER
        what = f"{show(kind) + ' parts are' if kind else 'this is'} not supported"
        if self.vision is None:  # the message of a text-only server, unchanged
            raise bad_request(f"{param} must be a text part {{\"type\": \"text\", \"text\": ...}}; {what} "
                              "(this model reads text)", param)
        raise bad_request(f"{param} must be a text part {{\"type\": \"text\", \"text\": ...}} or an image part "
                          f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:image/png;base64,...\"}}}}; "
                          f"{what}", param)

    def _image(self, part: dict, param: str):
        if self.vision is None:
            raise bad_request(f"model `{self.model}` does not take images (\"image_url\" parts are not supported: it "
                              "has no vision encoder): send text parts only; GET /v1/models lists each model's "
                              "input_modalities", param)
        spec = part.get("image_url")
        if isinstance(spec, dict):
            url, detail = spec.get("url"), spec.get("detail")
            if detail is not None and detail not in DETAILS:
                raise bad_request(f"{param}.detail must be one of {', '.join(DETAILS)}, got {show(detail)}",
                                  f"{param}.detail")
        elif isinstance(spec, str):
            url = spec
        else:
            raise bad_request(f"{param} must be an object {{\"url\": \"data:image/png;base64,...\"}} or a data URL "
                              f"string, got {show(spec)}", param)
        try:
            return to_pixels(decode_image(decode_data_url(url)), self.vision.image_size)
        except ImageError as e:
            raise bad_request(f"{param}: {e}", param) from None


def check_image_count(messages: list, vision: VisionConfig | None) -> None:
    """A 400 naming the limit when a request holds more images than `vision.max_images` (before decoding)."""
    params = count_image_parts(messages)
    if vision is not None and len(params) > vision.max_images:
        raise bad_request(f"the messages hold {len(params)} images; this model takes at most {vision.max_images} "
                          f"per request (vision.max_images): send fewer", params[vision.max_images])

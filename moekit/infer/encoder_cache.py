"""The encoder cache: each request's images, encoded once and kept as cross-attention K/V until it finishes.

A request with images runs the vision encoder and resampler once, at admission; every cross-attention
layer's K and V of its visual tokens (moekit/model/vision.py) are kept here, beside the paged KV cache,
keyed by request id, and freed with the request (vLLM's encoder cache plays the same part for its
encoder outputs). A preempted request keeps its entry: its text K/V is recomputed, its images are not.

Visual K/V do not grow with the text, so they are not paged: per request they are
images x cross-attention layers x 2 x n_latents x n_kv_head x head_dim elements.

Prefix caching must not hand one request another's K/V for the same text around a different image: a
request's block hashes are chained from a salt made of its images' pixel hashes (vLLM keys the blocks of
multimodal prompts by the media hashes in the same way).

Shape legend: I images, C channels, H x W pixels, G KV heads, L visual tokens per image, Dh head dim.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

import torch

from moekit.config import ModelConfig

KV = dict[int, tuple[torch.Tensor, torch.Tensor]]  # cross-attention layer -> (k_IGLDh, v_IGLDh)


def check_images(cfg: ModelConfig, ids: list[int], images: Sequence[torch.Tensor]) -> tuple[list[int], bytes]:
    """The marker positions of a prompt with `images` and its prefix-cache salt; ValueError if they disagree."""
    name = cfg.name
    if not cfg.has_vision:
        raise ValueError(f"model {name!r} does not take images (it has no vision encoder): send text only")
    v = cfg.vision
    if v.image_token_id < 0:
        raise ValueError(f"model {name!r} has no image marker token (vision.image_token_id is -1)")
    if len(images) > v.max_images:
        raise ValueError(f"{len(images)} images in one request; model {name!r} takes at most {v.max_images}")
    positions = [i for i, t in enumerate(ids) if t == v.image_token_id]
    if len(positions) != len(images):
        raise ValueError(f"the prompt has {len(positions)} image markers (token {v.image_token_id}) but "
                         f"{len(images)} images were given: one marker per image, in order")
    want = (v.channels, v.image_size, v.image_size)
    h = hashlib.sha256(b"images")
    for j, px in enumerate(images):
        if not isinstance(px, torch.Tensor) or tuple(px.shape) != want or not px.is_floating_point():
            raise ValueError(f"image {j}: expected float pixels of shape {want} (moekit.images.to_pixels), got "
                             f"{getattr(px, 'shape', type(px).__name__)}")
        h.update(px.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return positions, h.digest()


def image_of(positions: list[int], pos: int) -> int:
    """The request's image that the token at `pos` attends to: the last marker at or before it; -1 if none."""
    return bisect.bisect_right(positions, pos) - 1


class EncoderCache:
    def __init__(self):
        self.entries: dict[str, KV] = {}
        self.images_encoded = 0

    @torch.inference_mode()
    def add(self, request_id: str, model, images: Sequence[torch.Tensor]) -> None:
        """Encode a request's images (one batch through the encoder) and keep every layer's K/V."""
        w = model.tok_emb.weight
        pixels_ICHW = torch.stack(list(images)).to(device=w.device)
        self.entries[request_id] = model.cross_kv(model.encode_images(pixels_ICHW))
        self.images_encoded += len(images)

    def get(self, request_id: str) -> KV | None:
        return self.entries.get(request_id)

    def free(self, request_id: str) -> None:
        self.entries.pop(request_id, None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.entries.values() for pair in kv.values()
                   for t in pair)

    def check_empty(self) -> None:
        if self.entries:
            raise AssertionError(f"encoder cache entries left: {list(self.entries)[:4]}")

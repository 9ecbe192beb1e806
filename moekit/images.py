"""Images in: bytes or a data URL -> a checked RGB picture -> the pixel tensor a vision model reads.

One path for every way an image arrives (a training folder, `moekit generate --image`, the server's
`image_url` content parts), so each is checked the same way: a format from a short list, a pixel
count read from the header and refused *before* decoding (a 20k x 20k PNG is a few kilobytes of
file and 1.2 GB of pixels: a decompression bomb), truncated or corrupt data named as such.

    img = decode_image(data)                   # PIL.Image, RGB; ImageError (a ValueError) if bad
    pixels_CHW = to_pixels(img, 32)            # float32 in [-1, 1], resized to 32 x 32
    key = pixels_hash(pixels_CHW)              # what the model sees, hashed: the prefix-cache key
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings

import numpy as np
import torch

# Formats Pillow decodes safely and users send (OpenAI's vision API takes PNG, JPEG, WEBP and GIF). MPO is
# JPEG with extra frames: Pillow opens many camera and phone JPEGs as MPO.
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")
MAX_PIXELS = 4096 * 4096  # a bigger image is refused before it is decoded
MAX_BYTES = 20 * 1024 * 1024  # encoded size (OpenAI's limit per image is 20 MB)
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII | re.IGNORECASE)  # URL schemes and media types are case-insensitive (RFC 2397)


class ImageError(ValueError):
    """An image that cannot be used; the message says why and what to send instead."""


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL. Any other URL is refused: nothing is fetched."""
    if not isinstance(url, str):
        raise ImageError("image_url.url must be a string: a data URL such as data:image/png;base64,...")
    head = url[:16].lower()
    if head.startswith(("http://", "https://", "ftp://", "file:")):
        raise ImageError("image URLs are not fetched (this server fetches nothing): send the image inline as a "
                         "base64 data URL (data:image/png;base64,...)")
    m = _DATA_URL.match(url)
    if m is None:
        raise ImageError("image_url.url must be a base64 data URL (data:image/png;base64,...)")
    if not m["b64"]:
        raise ImageError("image data URL must be base64-encoded (data:image/png;base64,...)")
    mime = (m["mime"] or "").lower()
    if mime and not mime.startswith("image/"):
        raise ImageError(f"data URL media type {mime[:40]!r} is not an image: send image/png, image/jpeg, "
                         "image/webp or image/gif")
    payload = url[m.end():]
    if len(payload) > MAX_BYTES * 4 // 3 + 4:
        raise ImageError(f"image is larger than {MAX_BYTES // 2**20} MB encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL is not valid base64") from None


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS):
    """A PIL RGB image from encoded bytes, checked: format, pixel count (before decoding), integrity."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_BYTES:
        raise ImageError(f"image is {len(data) / 2**20:.1f} MB; the limit is {MAX_BYTES // 2**20} MB")
    try:
        # Pillow warns above 89M pixels; the check below refuses those anyway. (catch_warnings is not thread-safe
        # before Python 3.14: a race can at worst leave this one filter installed, which is harmless.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=None)  # reads the header only
    except UnidentifiedImageError:
        raise ImageError("the data is not an image in a known format: send PNG, JPEG, WEBP or GIF") from None
    except Image.DecompressionBombError:  # Pillow's own header check (> 2 x MAX_IMAGE_PIXELS), before ours
        raise ImageError(f"image is over {2 * Image.MAX_IMAGE_PIXELS:,} pixels; the limit is {max_pixels:,} pixels: "
                         "resize it first") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"the image cannot be read ({type(e).__name__}): is it truncated or corrupt?") from None
    if img.format not in FORMATS:
        raise ImageError(f"image format {img.format} is not supported: send {', '.join(FORMATS)}")
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise ImageError(f"image is {w} x {h} pixels; the limit is {max_pixels:,} pixels "
                         f"(for example {int(max_pixels ** 0.5)} x {int(max_pixels ** 0.5)}): resize it first")
    try:
        img.load()  # decodes; a truncated file fails here
        return _rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"the image data is truncated or corrupt ({str(e)[:80]})") from None


def _rgb(img):
    """Upright RGB: the EXIF orientation applied (a phone photo is stored sideways; transformers' `load_image`
    does the same), transparency composited onto white (a plain convert("RGB") turns the transparent
    background of black text on a clear PNG black too; Qwen2-VL's preprocessing composites onto white)."""
    from PIL import Image

    method = _ORIENTATION.get(_orientation(img))
    if method is not None:
        img = img.transpose(Image.Transpose[method])
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    return img.convert("RGB")


# EXIF orientation -> the transpose that makes the picture upright (the table of PIL.ImageOps.exif_transpose,
# which is not used itself: it also rewrites the EXIF block, and raises struct.error on a corrupt one).
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}


def _orientation(img) -> int:
    """The EXIF orientation tag, 1 (upright) when absent or unreadable: corrupt EXIF never refuses a picture."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - any failure to parse metadata means "no orientation"
        return 1
    return value if isinstance(value, int) else 1


def to_pixels(img, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1]: the image squashed to a square, as Flamingo resizes to 320 x 320."""
    from PIL import Image

    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return pixels_from_array(np.asarray(img))


def pixels_from_array(image_HWC: np.ndarray) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] from an (H, W, 3) uint8 array."""
    if image_HWC.dtype != np.uint8 or image_HWC.ndim != 3 or image_HWC.shape[2] != 3:
        raise ImageError(f"expected an (H, W, 3) uint8 array, got {image_HWC.dtype} {image_HWC.shape}")
    x = torch.from_numpy(np.array(image_HWC)).permute(2, 0, 1).to(torch.float32)  # a copy: PIL's arrays are read-only
    return x / 127.5 - 1.0


def load_image(path, size: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Pixels of an image file (a CLI's --image, a training folder's files)."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    try:
        return to_pixels(decode_image(data, max_pixels), size)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


def pixels_hash(pixels_CHW: torch.Tensor) -> bytes:
    """SHA-256 of the pixels the model sees: the same picture in two encodings is one cache key."""
    return hashlib.sha256(pixels_CHW.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()).digest()


__all__ = ["FORMATS", "MAX_PIXELS", "ImageError", "decode_data_url", "decode_image", "load_image",
           "pixels_from_array", "pixels_hash", "to_pixels"]

"""moekit/images.py: data URLs, checked decoding (formats, a decompression bomb refused before decoding,
truncated data), pixels in [-1, 1], and a pixel hash that is the same picture in any lossless encoding."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from moekit import images
from moekit.images import ImageError, decode_data_url, decode_image, pixels_from_array, pixels_hash, to_pixels


def picture(seed: int = 0, w: int = 24, h: int = 16) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def forged_png(w: int, h: int) -> bytes:
    """A valid PNG header declaring w x h 1-bit pixels, with a tiny IDAT: a few dozen bytes of file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                      ("GIF", "image/gif")])
def test_data_urls_of_the_formats_openai_takes_decode(fmt, mime):
    data = encode(picture(), fmt)
    assert decode_data_url(data_url(data, mime)) == data
    img = decode_image(decode_data_url(data_url(data, mime)))
    assert img.mode == "RGB" and img.size == (24, 16)
    # Scheme and media type are case-insensitive (RFC 2397); parameters before ;base64 are allowed.
    assert decode_data_url(data_url(data, mime.upper()).replace("data:", "DATA:", 1)) == data
    assert decode_data_url(data_url(data, mime + ";charset=binary")) == data


@pytest.mark.parametrize("url,message", [
    ("https://example.com/cat.png", "fetches nothing.*base64 data URL"),
    ("http://example.com/cat.png", "fetches nothing.*base64 data URL"),
    ("file:///etc/passwd", "not fetched"),
    ("cat.png", "must be a base64 data URL"),
    ("data:image/png,iVBORw0KGgo=", "must be base64-encoded"),
    ("data:image/png;base64,not*base64!", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "'text/plain' is not an image"),
])
def test_bad_data_urls_are_refused_with_what_to_send(url, message):
    with pytest.raises(ImageError, match=message):
        decode_data_url(url)
    with pytest.raises(ImageError, match="must be a string"):
        decode_data_url({"url": url})


def test_garbage_and_truncated_data():
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"hello, this is not a picture" * 10)
    png = encode(picture(1, 64, 64), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(png[: len(png) // 2])
    assert isinstance(ImageError("x"), ValueError)


@pytest.mark.parametrize("w,h", [(20000, 20000), (5000, 5000), (10000, 10000)])
def test_huge_images_are_refused_from_the_header_before_decoding(monkeypatch, w, h):
    # 20000 x 20000 is over Pillow's own bomb limit (raised in Image.open), 10000 x 10000 between its warning
    # and its error, 5000 x 5000 only over moekit's MAX_PIXELS: each gets the same kind of message.
    data, small = forged_png(w, h), encode(picture(), "PNG")
    assert len(data) < 200

    def no_decoding(self, *a, **k):
        raise AssertionError("load() was called: the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ImageError, match=r"the limit is 16,777,216 pixels.*resize it"):
            decode_image(data)
    with pytest.raises(ImageError, match="the limit is 100 pixels"):
        decode_image(small, max_pixels=100)


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "TGA"])
def test_unsupported_formats_are_named(fmt):
    with pytest.raises(ImageError, match=f"image format {fmt} is not supported: send PNG, JPEG"):
        decode_image(encode(picture(), fmt))


def test_camera_jpegs_alpha_and_orientation():
    # Pillow opens a multi-picture JPEG (what many cameras write) as MPO: accepted, first frame.
    mpo = encode(picture(0), "MPO", save_all=True, append_images=[picture(1)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO" and decode_image(mpo).size == (24, 16)
    # Black text on a clear background stays readable: transparency is composited onto white.
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    clear.putpixel((3, 3), (0, 0, 0, 255))
    px = to_pixels(decode_image(encode(clear, "PNG")), 8)
    assert px[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and px[:, 3, 3].tolist() == [-1.0, -1.0, -1.0]
    # EXIF orientation 6 (the camera was turned): stored 24 x 16, shown upright as 16 x 24.
    exif = Image.Exif()
    exif[0x0112] = 6
    assert decode_image(encode(picture(), "JPEG", exif=exif.tobytes())).size == (16, 24)
    # A corrupt EXIF block does not refuse the picture (it is only metadata).
    data = bytearray(encode(picture(), "JPEG", exif=exif.tobytes()))
    at = data.find(b"Exif") + 16
    data[at:at + 8] = b"\xff" * 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the EXIF block while opening
        assert decode_image(bytes(data)).size in ((24, 16), (16, 24))


def test_to_pixels_shape_range_and_channel_order():
    red = Image.new("RGB", (40, 10), (255, 0, 0))
    px = to_pixels(red, 16)
    assert px.shape == (3, 16, 16) and px.dtype == torch.float32
    assert torch.equal(px[0], torch.ones(16, 16)) and torch.equal(px[1:], -torch.ones(2, 16, 16))
    px = to_pixels(picture(3, 32, 32), 32)  # no resize: exactly x / 127.5 - 1
    expected = torch.from_numpy(np.array(picture(3, 32, 32))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(px, expected) and -1 <= px.min() and px.max() <= 1
    assert to_pixels(Image.new("L", (5, 5), 255), 4).shape == (3, 4, 4)  # grey -> RGB
    with pytest.raises(ImageError, match="uint8"):
        pixels_from_array(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match=r"\(H, W, 3\)"):
        pixels_from_array(np.zeros((4, 4), np.uint8))


def test_pixels_hash_is_the_picture_not_its_encoding(tmp_path):
    img = picture(5)
    encodings = [encode(img, "PNG"), encode(img, "WEBP", lossless=True), encode(img, "BMP")]
    hashes = {pixels_hash(to_pixels(decode_image(d), 16)) for d in encodings}
    assert len(hashes) == 1
    other = picture(6)
    assert pixels_hash(to_pixels(other, 16)) not in hashes
    nudged = np.asarray(img).copy()
    nudged[0, 0, 0] ^= 1  # one bit of one pixel
    assert pixels_hash(pixels_from_array(nudged)) != pixels_hash(pixels_from_array(np.asarray(img)))
    assert len(pixels_hash(to_pixels(img, 16))) == 32
    # load_image: the same pixels from a file; a bad file names its path
    (tmp_path / "a.png").write_bytes(encodings[0])
    assert pixels_hash(images.load_image(tmp_path / "a.png", 16)) in hashes
    (tmp_path / "b.png").write_bytes(encodings[0][:40])
    with pytest.raises(ImageError, match="b.png: "):
        images.load_image(tmp_path / "b.png", 16)

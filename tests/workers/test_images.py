"""Every Pillow-readable format is accepted, bad files are rejected with a reason."""
import io

import numpy as np
import pytest
from PIL import Image

from workers.images import RejectedImage, decode_bytes, encode


def _png(arr, mode, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_keep_stores_original_bytes_untouched():
    data = _png(np.arange(64, dtype=np.uint8).reshape(8, 8), "L")
    enc = encode(data, "keep")
    assert enc.data == data and enc.ext == "png" and enc.mode == "L" and enc.size == (8, 8)


def test_16bit_png_kept_16bit_in_png_and_scaled_to_8bit_on_decode():
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    img = Image.fromarray(arr)  # uint16 -> I;16
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    enc = encode(buf.getvalue(), "png")
    assert enc.mode.startswith("I")
    back = Image.open(io.BytesIO(enc.data))
    assert np.array_equal(np.asarray(back).astype(np.uint16), arr)
    dec = decode_bytes(enc.data, 1)
    assert dec.shape == (8, 8, 1) and dec.dtype == np.uint8
    expected = np.clip(arr / 65535.0 * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(dec[:, :, 0], expected)
    # JPEG holds 8 bit only: the same scaling, not a clip at 255
    jpg = decode_bytes(encode(buf.getvalue(), "jpeg").data, 1)
    assert np.abs(jpg[:, :, 0].astype(int) - expected).max() <= 3


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is a text file pretending to be a jpg\n", "not an image"),
])
def test_bad_bytes_rejected_with_reason(data, reason):
    with pytest.raises(RejectedImage, match=reason):
        encode(data, "keep")


def test_truncated_jpeg_rejected():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(RejectedImage, match="truncated|corrupt"):
        encode(buf.getvalue()[: len(buf.getvalue()) // 2], "keep")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA"])
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_reencode_modes(mode, fmt):
    # a smooth image (JPEG's chroma subsampling would wreck random noise)
    yy, xx = np.mgrid[0:16, 0:16]
    base = Image.fromarray(np.stack([xx * 16, yy * 16, (xx + yy) * 8], -1).astype(np.uint8), "RGB")
    img = base.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    enc = encode(buf.getvalue(), fmt)
    assert enc.mode == mode and enc.ext == {"png": "png", "jpeg": "jpg", "webp": "webp"}[fmt]
    channels = 1 if mode in ("L", "LA") else 3
    out = decode_bytes(enc.data, channels)
    ref = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    ref = ref[:, :, None] if ref.ndim == 2 else ref
    err = np.abs(out.astype(int) - ref)
    assert out.shape == ref.shape
    if fmt == "jpeg":  # lossy: small mean error (palette dithering makes single pixels jump)
        assert err.mean() < 12
    else:  # PNG and lossless WebP are exact
        assert err.max() == 0

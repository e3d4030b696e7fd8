"""Every Pillow-readable format is accepted, bad files are rejected with a reason."""
import io

import numpy as np
import pytest
from PIL import Image

from workers.data.images import RejectedImage, decode_bytes, encode


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


@pytest.mark.slow  # starts a separate Python process
def test_native_decoder_loads_without_torchvision_and_matches_torchvision_io():
    """The stream decodes through torchvision's compiled op loaded directly (no 2.5 s package
    import per loader worker); it must give torchvision.io's pixels for PNG/JPEG/WebP, gray and RGB."""
    import subprocess
    import sys

    code = ("import sys; from workers.data.images import native_decoder; "
            "print(native_decoder() is not None, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]

    import torch
    from torchvision.io import ImageReadMode, decode_image

    from workers.data.images import native_decoder

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buf, format=fmt)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        for mode, value in ((ImageReadMode.GRAY, 1), (ImageReadMode.RGB, 3)):
            ours = native_decoder()(data, value, False)
            if not (fmt == "WEBP" and value == 1):  # WebP has no gray mode: 3 channels come back,
                assert ours.dtype == torch.uint8 and ours.shape == (value, 20, 24), (fmt, mode)  # stream → Pillow
            assert torch.equal(ours, decode_image(data, mode=mode)), (fmt, mode)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_stream_decoder_gives_the_manifest_channels(fmt, ext):
    """A gray run stored as WebP (which torchvision cannot decode to gray) still yields (1, H, W)."""
    from workers.data.stream import SampleDecoder

    rgb = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format=fmt)
    for channels in (1, 3):
        out = SampleDecoder({"channels": channels})({"__key__": "k", ext: buf.getvalue(), "cls": b"3"})
        assert out["image"].shape == (channels, 12, 10) and out["image"].dtype.is_floating_point is False
        assert out["label"] == 3

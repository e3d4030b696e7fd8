"""Small image folders written on the fly for the tests."""
from __future__ import annotations

import numpy as np


def write_images(root, n_classes: int = 2, per_class: int = 6, size: int = 12, mode: str = "L",
                 fmt: str = "PNG", seed: int = 0, flat: bool = False) -> dict:
    """Write a small ImageFolder (or flat folder) of random images; returns {relpath: (array, label)}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}[fmt]
    for c in range(n_classes):
        d = root if flat else root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size) if mode == "L" else (size, size, 3)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            name = f"c{c}_{i:03d}.{ext}"
            Image.fromarray(arr, mode).save(d / name, format=fmt)
            rel = name if flat else f"class{c}/{name}"
            out[rel] = (arr, None if flat else c)
    return out


def write_separable(root, n_classes: int = 3, per_class: int = 10, size: int = 8, mode: str = "L",
                    noise: int = 12, seed: int = 0, splits: tuple = ()) -> None:
    """An ImageFolder whose classes are separable in pixel space: class c is a fixed random
    pattern (its prototype, drawn once from ``seed``) plus uniform noise of ±``noise`` per pixel,
    so both a linear probe and cosine kNN on raw pixels separate the classes. With ``splits``
    (e.g. ("train", "test")) one sub-folder per split, each with ``per_class`` images per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    protos = [rng.integers(noise, 256 - noise, shape) for _ in range(n_classes)]
    for split in splits or ("",):
        for c in range(n_classes):
            d = (root / split / f"class{c}") if split else (root / f"class{c}")
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = (protos[c] + rng.integers(-noise, noise + 1, shape)).astype(np.uint8)
                Image.fromarray(arr, mode).save(d / f"c{c}_{i:03d}.png")

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

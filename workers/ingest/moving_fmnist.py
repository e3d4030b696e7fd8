"""``moving-fashion-mnist``: a seeded generator of video clips built on the Fashion-MNIST package,
as Moving MNIST (Srivastava et al. 2015) was built on MNIST, written as real video files.

Each clip shows 1 or 2 Fashion-MNIST items, each tinted with its own colour, moving in a larger
frame. What the temporal methods need is built in:

* **Dynamics that are not time-reversible**, so the arrow of time is well posed (a lossless bounce
  looks the same played backwards): every item loses energy. Two motion kinds, the clip's label:
  ``bounce`` (gravity, inelastic bounces off the floor and walls, friction on the floor, air drag)
  and ``slide`` (no gravity, a constant friction that slows it down, inelastic walls). Mechanical
  energy (kinetic, plus potential under gravity) never rises from one frame to the next and falls
  over every clip (:func:`simulate` returns it; a test holds it).
* **Two synchronised cameras** of the same scene (for TCN): ``cam1`` sees the world as simulated
  on a vertical gradient; ``cam2`` sees it zoomed (0.75–0.95) about a shifted centre, with its own
  tint and a checkerboard background.
* **Per-frame item masks** (for label propagation), for both cameras, and each item's colour.
* **A sound track**, with ``sound=True`` (``moving-fashion-mnist-sound``, for audio-visual
  correspondence): one of the clip's items, drawn at random, makes its class's sound (a class
  timbre: :func:`class_sound`, louder as the item moves faster) and the others are silent, so "which
  item is making the sound" has a ground truth (``sound.item`` in the clip's ``.json``). The track
  (16 kHz, 16-bit PCM) is muxed into cam1's video file, as a real video carries its sound.

Files, under ``root/{train,test}/{motion}/``, one set per clip ``NAME``: ``NAME.mkv`` (cam1: FFV1 in
Matroska, a lossless video file that FFmpeg decodes like any other, so masks match pixels exactly
and the same seed gives the same frames; x264 through PyAV did not give the same bytes twice here),
``NAME.cam2.mkv``, ``NAME.json`` (motion kind, item
classes and colours, frame rate, seed) and ``NAME.masks.npz`` (``cam1``, ``cam2``: uint8
``(T, H, W)``, 0 background, ``i + 1`` item ``i`` where it is in front). Items for train clips come
from Fashion-MNIST's train split, for test clips from its test split. The labels are for
evaluation only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

MOTIONS = ("bounce", "slide")
VIEWS = ("cam1", "cam2")
ITEM = 28                     # Fashion-MNIST's side
PALETTE = np.array([[255, 80, 80], [80, 200, 255], [255, 210, 60], [120, 255, 120], [220, 120, 255],
                    [255, 150, 40]], np.float32) / 255.0


@dataclass
class Scene:
    """One clip's world: the items and their trajectories (top-left corners, world pixels)."""

    motion: str
    classes: list[int]
    images: list[np.ndarray]          # (28, 28) uint8 each
    colours: list[list[float]]        # RGB in [0, 1]
    positions: np.ndarray             # (T, items, 2) float: x, y of each item's top-left corner
    energy: np.ndarray = field(default=None)  # (T, items) mechanical energy per unit mass


def simulate(motion: str, items: int, frames: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (T, items, 2) and mechanical energies (T, items) — ½|v|², plus g·height for
    ``bounce`` — of ``items`` boxes of side 28 in a ``size`` world.

    bounce: v_y += g; x += v; v *= (1 - drag); at the floor y = size - 28, v_y = -e v_y and
    v_x *= floor friction; walls reflect v_x with e. slide: no gravity; |v| decreases by a constant
    friction each frame (v *= max(0, 1 - mu / |v|)); walls reflect with e. e = 0.75."""
    if motion not in MOTIONS:
        raise ValueError(f"motion {motion!r}: one of {MOTIONS}")
    lim = size - ITEM
    pos = rng.uniform(0, lim, (items, 2))
    speed0 = rng.uniform(3.0, 5.0, items)
    angle = rng.uniform(0, 2 * np.pi, items)
    vel = np.stack([np.cos(angle), np.sin(angle)], 1) * speed0[:, None]
    if motion == "bounce":
        pos[:, 1] = rng.uniform(0, lim * 0.4, items)     # start high, so there is a fall
    g, drag, e, floor_mu, mu = 0.5, 0.01, 0.75, 0.85, 0.12
    out_p, out_e = np.zeros((frames, items, 2)), np.zeros((frames, items))
    for t in range(frames):
        out_p[t] = pos
        out_e[t] = 0.5 * (vel ** 2).sum(1) + (g * (lim - pos[:, 1]) if motion == "bounce" else 0.0)
        if motion == "bounce":
            vel[:, 1] += g
            vel *= 1 - drag
        else:
            norm = np.maximum(np.linalg.norm(vel, axis=1, keepdims=True), 1e-9)
            vel *= np.maximum(0.0, 1 - mu / norm)
        pos += vel
        for k in range(2):
            low, high = pos[:, k] < 0, pos[:, k] > lim
            pos[low, k], pos[high, k] = -pos[low, k] * e, lim - (pos[high, k] - lim) * e
            vel[low | high, k] *= -e
            if motion == "bounce" and k == 1:
                vel[high, 0] *= floor_mu
        np.clip(pos, 0, lim, out=pos)
    return out_p, out_e


@dataclass(frozen=True)
class Camera:
    zoom: float = 1.0
    centre: tuple[float, float] = (0.5, 0.5)   # the world point at the view's centre, in world fractions
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    background: str = "gradient"               # "gradient" | "checker"


SOUND_RATE = 16000
# class timbres: a fundamental a few semitones apart for each of the ten classes, its own mix of six
# harmonics and its own tremolo rate (Hz), so the class can be heard
CLASS_F0 = 196.0 * 2.0 ** (np.arange(10) * 4 / 12)
CLASS_HARMONICS = np.random.default_rng(1234).dirichlet(np.ones(6) * 0.6, size=10)
CLASS_TREMOLO = np.linspace(2.0, 9.0, 10)


def class_sound(cls: int, speed: np.ndarray, fps: float, rate: int = SOUND_RATE,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """The sound of an item of class ``cls`` whose speed per frame is ``speed`` (T,): its class's timbre
    with a loudness that follows the speed (0.3 at rest to 1 at its fastest), faint noise at 30 dB SNR.
    Returns float32 mono ``(round(T / fps · rate),)``, peak 0.5."""
    n = int(round(len(speed) / fps * rate))
    t = np.arange(n) / rate
    f0 = CLASS_F0[cls % 10]
    tone = sum(w * np.sin(2 * np.pi * f0 * (h + 1) * t) for h, w in enumerate(CLASS_HARMONICS[cls % 10]))
    tone *= 0.75 + 0.25 * np.sin(2 * np.pi * CLASS_TREMOLO[cls % 10] * t)
    loud = np.interp(t, np.arange(len(speed)) / fps, 0.3 + 0.7 * speed / max(float(speed.max()), 1e-6))
    x = tone * loud
    if rng is not None:
        x = x + rng.standard_normal(n) * np.sqrt(np.mean(x ** 2) / 1e3)
    return (0.5 * x / max(float(np.abs(x).max()), 1e-6)).astype(np.float32)


def _background(kind: str, size: int, tint) -> np.ndarray:
    if kind == "gradient":
        g = np.linspace(0.05, 0.3, size, dtype=np.float32)[:, None].repeat(size, 1)
    else:
        idx = (np.arange(size) // 8)
        g = np.where((idx[:, None] + idx[None, :]) % 2 == 0, 0.12, 0.22).astype(np.float32)
    return g[:, :, None] * np.asarray(tint, np.float32)


def render(scene: Scene, camera: Camera, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The scene seen by ``camera``: uint8 frames (T, 3, size, size) and masks (T, size, size)."""
    from PIL import Image

    frames, items = scene.positions.shape[:2]
    side = max(2, int(round(ITEM * camera.zoom)))
    sprites = [np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR), np.float32) / 255.0
               for img in scene.images]
    cx, cy = camera.centre[0] * size, camera.centre[1] * size
    bg = _background(camera.background, size, camera.tint)
    video = np.empty((frames, size, size, 3), np.float32)
    masks = np.zeros((frames, size, size), np.uint8)
    for t in range(frames):
        canvas = bg.copy()
        for i in range(items):
            x, y = scene.positions[t, i]
            vx = int(round((x - cx) * camera.zoom + size / 2))
            vy = int(round((y - cy) * camera.zoom + size / 2))
            x0, y0, x1, y1 = max(vx, 0), max(vy, 0), min(vx + side, size), min(vy + side, size)
            if x0 >= x1 or y0 >= y1:
                continue
            alpha = sprites[i][y0 - vy:y1 - vy, x0 - vx:x1 - vx]
            colour = np.asarray(scene.colours[i], np.float32) * np.asarray(camera.tint, np.float32)
            region = canvas[y0:y1, x0:x1]
            canvas[y0:y1, x0:x1] = region * (1 - alpha[..., None]) + alpha[..., None] * colour
            masks[t, y0:y1, x0:x1][alpha > 0.25] = i + 1
        video[t] = canvas
    return (np.clip(video, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 3, 1, 2), masks


def make_scene(motion: str, items_pool: tuple[np.ndarray, np.ndarray], frames: int, size: int,
               rng: np.random.Generator) -> Scene:
    images, labels = items_pool
    n = int(rng.integers(1, 3))
    pick = rng.choice(len(images), n, replace=False)
    colours = PALETTE[rng.choice(len(PALETTE), n, replace=False)].tolist()
    pos, energy = simulate(motion, n, frames, size, rng)
    return Scene(motion, [int(labels[i]) for i in pick], [images[i] for i in pick], colours, pos, energy)


def second_camera(rng: np.random.Generator) -> Camera:
    return Camera(zoom=float(rng.uniform(0.75, 0.95)), centre=(float(rng.uniform(0.4, 0.6)), float(rng.uniform(0.4, 0.6))),
                  tint=tuple(float(x) for x in rng.uniform(0.7, 1.0, 3)), background="checker")


def generate(root: str, clips: dict[str, int], fashion, frames: int = 20, size: int = 64, fps: float = 10.0,
             seed: int = 0, progress=None, sound: bool = False) -> dict:
    """Write ``clips[split]`` clips per split ("train", "test") under ``root`` with the items of
    ``fashion`` (``workers.ingest.sources.FashionMNIST``); returns the index written to
    ``root/moving_fmnist.json``. A clip already on disk is kept (the generator is deterministic per
    clip: ``seed``, split and index), so an interrupted run resumes. ``sound``: cam1's file carries
    a sound track (see the module docstring); the clips' pictures are the same either way."""
    from workers.data.clips import encode_clip

    fm = fashion
    pools = {split: fm.arrays("test" if split == "test" else "train") for split in clips}
    index = {"frames": frames, "size": size, "fps": fps, "seed": seed, "motions": list(MOTIONS), "views": list(VIEWS),
             "classes": list(fm.classes), "splits": {}, "sound": sound}
    for split, n in clips.items():
        index["splits"][split] = n
        for k in range(n):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, k])
            motion = MOTIONS[k % len(MOTIONS)]
            folder = os.path.join(root, split, motion)
            name = os.path.join(folder, f"{split}_{k:06d}")
            if os.path.exists(name + ".json"):  # written last: the clip is whole
                if progress:
                    progress(1)
                continue
            os.makedirs(folder, exist_ok=True)
            scene = make_scene(motion, pools[split], frames, size, rng)
            cams = {"cam1": Camera(), "cam2": second_camera(rng)}
            track, sounding = None, None
            if sound:  # its own generator: the pictures stay those of the silent data set
                srng = np.random.default_rng([seed, 0 if split == "train" else 1, k, 1])
                sounding = int(srng.integers(len(scene.classes)))
                speed = np.linalg.norm(np.diff(scene.positions[:, sounding], axis=0, prepend=scene.positions[:1, sounding]),
                                       axis=-1)
                track = class_sound(scene.classes[sounding], speed, fps, SOUND_RATE, srng)
            masks = {}
            for view, cam in cams.items():
                video, masks[view] = render(scene, cam, size)
                path = name + (".mkv" if view == "cam1" else f".{view}.mkv")
                with open(path + ".tmp", "wb") as f:
                    f.write(encode_clip(video, "ffv1", fps, track if view == "cam1" else None, SOUND_RATE))
                os.replace(path + ".tmp", path)
            np.savez_compressed(name + ".masks.npz", **masks)
            meta = {"motion": motion, "classes": scene.classes, "class_names": [fm.classes[c] for c in scene.classes],
                    "colours": scene.colours, "fps": fps, "frames": frames, "seed": [seed, split, k],
                    "cameras": {v: vars(c) | {"centre": list(c.centre), "tint": list(c.tint)} for v, c in cams.items()}}
            if sound:
                meta["sound"] = {"item": sounding, "class": scene.classes[sounding], "rate": SOUND_RATE}
            with open(name + ".json.tmp", "w") as f:
                json.dump(meta, f)
            os.replace(name + ".json.tmp", name + ".json")
            if progress:
                progress(1)
    with open(os.path.join(root, "moving_fmnist.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index

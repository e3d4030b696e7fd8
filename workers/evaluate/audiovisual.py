"""The protocols of an audio-visual checkpoint (``av_correspondence``) on clips with a sound track.

They need the whole objective, not only its vision backbone: the audio sub-network and both
projections into the joint space (``checkpoints/final/backbone.pt`` carries them for this objective).
Each test clip's middle frame and its sound track:

* ``run_av_retrieval`` — "which item sounds": each clip's sound ranks every test clip's middle frame
  by the correspondence score (the maximum over the frame's positions of the cosine between the
  sound's embedding and the position's); top-1 is right when the retrieved clip's sounding item has
  the query's class (several clips share a class, so exact-clip retrieval is given in the details,
  with the chance level of each);
* ``run_av_localisation`` — "where is it coming from": the peak of the similarity map of a clip's
  frame and its own sound falls on the sounding item when the item covers at least a quarter of the
  peak's cell in the clip's masks; chance is the share of the map's cells that would count.

The sources are ``pretrained`` and ``random_init`` (the same objective with seeded random weights);
the input baselines have no joint space of sound and picture, and the supervised reference is a
vision network only: they are not run here.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from workers.evaluate.protocols import Result, timed

Evaluation = Any  # a workers.evaluate.evaluation.Evaluation (that module imports this one)

NEEDS = {"av_retrieval": ("test",), "av_localisation": ("test",)}
SOURCES = ("pretrained", "random_init")
MIN_COVER = 0.25   # share of the peak's cell the sounding item must cover


def objective_for(ev: Evaluation, source: str):
    """The whole audio-visual objective behind ``source`` (pretrained, or seeded random weights)."""
    if source == "pretrained":
        return ev.checkpoint.objective
    with ev.lock_for("av_random_init"):
        if not hasattr(ev, "_av_random"):
            from workers.evaluate.features import SEED_LOCK
            from workers.model import build_objective

            with SEED_LOCK:
                torch.manual_seed(ev.config.seed)
                ev._av_random = build_objective(ev.checkpoint.config, ev.manifest["channels"]).eval()
        return ev._av_random


def _test_data(ev: Evaluation, protocol: str) -> Optional[dict]:
    """Test's middle frames, sound tracks, masks and sounding items; None (refused, with the reason) without them."""
    data = ev.split("test")
    if data.get("audio") is None:
        ev.refuse(protocol, f"{protocol} needs the test clips' sound tracks; the run's clips have none")
        return None
    sound = [i.get("sound") for i in data["info"]]
    if any(s is None for s in sound):
        ev.refuse(protocol, f"{protocol} needs which item sounds in each test clip (info.sound in the clips' .json)")
        return None
    if protocol == "av_localisation" and data.get("masks") is None:
        ev.refuse(protocol, f"{protocol} needs the test clips' masks (NAME.masks.npz)")
        return None
    mid = data["clip"].shape[1] // 2
    return {"frames": data["clip"][:, mid], "audio": data["audio"], "item": torch.tensor([s["item"] for s in sound]),
            "cls": torch.tensor([s["class"] for s in sound]),
            "masks": None if data.get("masks") is None else data["masks"][:, mid]}


@torch.no_grad()
def _embed(ev: Evaluation, source: str, d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio embeddings (N, E), frame maps (N, E, h, w)) of ``source``'s objective, in batches, float32
    on the CPU; computed once per source, both protocols read them."""
    with ev.lock_for(("av_embed", source)):
        cache = ev.__dict__.setdefault("_av_embeddings", {})
        if source not in cache:
            objective, bs, dev = objective_for(ev, source), ev.config.batch_size, ev.device
            audio, maps = [], []
            for i in range(0, len(d["frames"]), bs):
                audio.append(objective.embed_audio(d["audio"][i:i + bs].to(dev)).float().cpu())
                maps.append(objective.embed_map(objective.preprocess(d["frames"][i:i + bs].to(dev))).float().cpu())
            cache[source] = torch.cat(audio), torch.cat(maps)
        return cache[source]


@timed
def run_av_retrieval(ev: Evaluation, source: str) -> Result:
    """Sound → frame retrieval over the test clips, scored on the sounding item's class (see the module)."""
    r = Result("av_retrieval", source)
    d = _test_data(ev, "av_retrieval")
    if d is None:
        return r
    a, v = _embed(ev, source, d)
    scores = torch.einsum("ie,jehw->ijhw", a, v).flatten(2).amax(2)              # (N queries, N frames)
    top = scores.argmax(1)
    same = d["cls"][:, None] == d["cls"][None, :]
    r.details = {"top1_class": float(same[torch.arange(len(top)), top].float().mean()),
                 "top1_clip": float((top == torch.arange(len(top))).float().mean()),
                 "chance_class": float(same.float().mean()), "chance_clip": 1.0 / len(top), "clips": len(top)}
    r.add("av_retrieval", "top1", r.details["top1_class"])
    return r


@timed
def run_av_localisation(ev: Evaluation, source: str) -> Result:
    """Does the peak of a frame's similarity map with its own sound fall on the sounding item? (see the module)"""
    r = Result("av_localisation", source)
    d = _test_data(ev, "av_localisation")
    if d is None:
        return r
    a, v = _embed(ev, source, d)
    sim = torch.einsum("ie,iehw->ihw", a, v)                                    # (N, h, w)
    n, h, w = sim.shape
    # share of each cell of the map the sounding item covers in the frame's mask
    on_item = (d["masks"].long() == (d["item"] + 1)[:, None, None]).float()[:, None]   # (N, 1, H, W)
    cover = F.adaptive_avg_pool2d(on_item, (h, w))[:, 0]                           # (N, h, w)
    hit_cells = cover >= MIN_COVER
    visible = hit_cells.flatten(1).any(1)                                          # the item is in the middle frame
    peak = sim.flatten(1).argmax(1)
    hits = hit_cells.flatten(1)[torch.arange(n), peak] & visible
    m = int(visible.sum())
    r.details = {"hit": float(hits.sum()) / max(1, m), "chance": float(hit_cells.flatten(1).float().mean(1)[visible].mean())
                 if m else 0.0, "clips": m, "map": [h, w], "min_cover": MIN_COVER}
    if m:
        r.add("av_localisation", "hit", r.details["hit"])
    return r


AV_RUNS = {"av_retrieval": run_av_retrieval, "av_localisation": run_av_localisation}

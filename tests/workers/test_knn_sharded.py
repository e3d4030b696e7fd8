"""The online kNN monitor's feature extraction split over two gloo ranks gives every rank the
same features, in the same order, as one process embedding all images."""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.knn import extract_features, extract_features_sharded

pytestmark = pytest.mark.slow  # 2 gloo processes

N = 7  # not a multiple of the world size: the last rank's share is padded


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (N, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _fn(x: torch.Tensor) -> torch.Tensor:
    w = torch.arange(48, dtype=torch.float32).reshape(16, 3) / 48  # any fixed map: (B, 16) → (B, 3)
    return x.float().flatten(1) @ w


def _worker(rank: int, world: int, tmpdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        seen = []
        fn = lambda x: (seen.append(len(x)), _fn(x))[1]  # noqa: E731
        feats = extract_features_sharded(fn, _images(), batch_size=2)
        torch.save({"features": feats, "embedded": sum(seen)}, os.path.join(tmpdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_each_rank_embeds_a_share_and_gets_all_features_in_order(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ref = extract_features(_fn, _images())  # no process group here: one process, all images
    assert torch.equal(extract_features_sharded(_fn, _images()), ref)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["features"].shape == (N, 3)
        assert torch.allclose(got["features"], ref), f"rank {r}"
        assert got["embedded"] == 4  # ceil(7 / 2): half the work each, not all 7

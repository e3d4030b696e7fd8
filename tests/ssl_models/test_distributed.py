"""Two gloo ranks × B samples give the same losses and gradients as one process on 2B samples.

One ``torch.multiprocessing.spawn`` of 2 ranks (module-scoped fixture) runs every case and saves
its results; the test process, where torch.distributed is not initialised, computes the
single-process references on the whole batch and compares. The objectives run wrapped in
DistributedDataParallel exactly as the training loop wraps them, so DDP's gradient averaging
is part of what is checked. The backbone is a tiny MLP without BatchNorm: with per-rank
BatchNorm statistics the maths would not promise equality.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssl_models import distributed as D
from ssl_models.losses import nt_xent, sinkhorn
from ssl_models.objectives.moco import MoCo
from ssl_models.objectives.simclr import SimCLR
from ssl_models.objectives.swav import SwAV
from ssl_models.sync_bn import GlobalBatchNorm, convert_sync_batchnorm

pytestmark = pytest.mark.slow  # 2 gloo processes

WORLD = 2
B = 4                     # per rank; the single-process reference sees WORLD·B
SIDE = 8


class TinyMLP(nn.Module):
    """Backbone stand-in: flatten → Linear → ReLU → Linear, no normalisation layers."""

    def __init__(self, in_channels: int = 1, side: int = SIDE, feature_dim: int = 8):
        super().__init__()
        self.in_channels, self.feature_dim = in_channels, feature_dim
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, 16), nn.ReLU(),
                                 nn.Linear(16, feature_dim))

    def forward(self, x):
        return self.net(x)


def _data(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "z1": torch.randn(n, 6, generator=g), "z2": torch.randn(n, 6, generator=g),
        "view1": torch.randn(n, 1, SIDE, SIDE, generator=g), "view2": torch.randn(n, 1, SIDE, SIDE, generator=g),
        "global": torch.randn(2, n, 1, SIDE, SIDE, generator=g), "local": torch.randn(2, n, 1, SIDE, SIDE, generator=g),
        "scores": torch.nn.functional.normalize(torch.randn(n, 5, generator=g), dim=1),
        "weights": torch.randn(WORLD * n, 3, generator=g),
    }


def _build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "simclr":
        return SimCLR(TinyMLP(), image_size=SIDE, hidden_dim=16, out_dim=8, batch_norm=False, temperature=0.5)
    if kind.startswith("moco"):
        key_bn = kind.split("_")[1]
        return MoCo(TinyMLP(), image_size=SIDE, hidden_dim=16, out_dim=8, queue_size=32, momentum=0.9,
                    key_bn=key_bn, temperature=0.2)
    if kind.startswith("swav"):
        queue = dict(queue_length=WORLD * B, queue_start_steps=0) if kind == "swav_queue" else {}
        return SwAV(TinyMLP(), image_size=SIDE, hidden_dim=16, out_dim=8, batch_norm=False, n_prototypes=5,
                    n_global=2, n_local=2, local_size=SIDE, freeze_prototypes_steps=0, temperature=0.1, **queue)
    raise ValueError(kind)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def run_cases(rank: int, world: int, n: int) -> dict:
    """Every case on this rank's slice of the data (all of it when world == 1)."""
    data = _data(WORLD * B)
    sl = slice(rank * n, (rank + 1) * n)
    res: dict = {}

    # nt_xent on raw embeddings: loss and gradient wrt this rank's rows.
    z1 = data["z1"][sl].clone().requires_grad_(True)
    z2 = data["z2"][sl].clone().requires_grad_(True)
    loss = nt_xent(z1, z2, temperature=0.3)
    loss.backward()
    res["nt_xent"] = (loss.detach(), z1.grad.clone(), z2.grad.clone())

    # gather_with_grad: d(Σ_r <gather(x), w_r>)/dx_local = Σ_r w_r[local rows].
    x = torch.arange(n * 3, dtype=torch.float32).view(n, 3).add(100 * rank).requires_grad_(True)
    y = D.gather_with_grad(x)
    (y * data["weights"][: y.shape[0]] * (rank + 1)).sum().backward()
    res["gather"] = (y.detach(), x.grad.clone())

    # gather_for_global_loss: the same global loss on every rank; backward without communication.
    x = torch.arange(n * 3, dtype=torch.float32).view(n, 3).add(100 * rank).requires_grad_(True)
    y = D.gather_for_global_loss(x)
    (y * data["weights"][: y.shape[0]]).sum().div(world).backward()
    res["gather_global"] = (y.detach(), x.grad.clone())

    # Sinkhorn over the global batch.
    res["sinkhorn"] = sinkhorn(data["scores"][sl], epsilon=0.05, iterations=3)

    def wrap(model):
        return nn.parallel.DistributedDataParallel(model) if world > 1 else model

    # sync_bn on CPU: global-batch statistics. Two ranks of GlobalBatchNorm in DDP against plain
    # BatchNorm in one process: outputs, input and parameter gradients, running statistics.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * SIDE * SIDE, 5), nn.BatchNorm1d(5, momentum=None))
    if world > 1:
        net = convert_sync_batchnorm(net, "cpu")
        assert isinstance(net[1], GlobalBatchNorm) and isinstance(net[5], GlobalBatchNorm)
    x = (data["view1"][sl] * 3 + 1).clone().requires_grad_(True)
    model = wrap(net)  # kept: DDP's reducer must outlive the backward
    y = model(x)
    (y * data["weights"][sl, :1]).pow(2).mean().backward()  # weights differ per sample
    res["global_bn"] = {"y": y.detach(), "x_grad": x.grad.clone(), "grads": _grads(net),
                        "running": [b.clone() for b in net.buffers()]}

    for kind in ("simclr", "moco_none", "moco_shuffle", "swav", "swav_queue"):
        module = _build(kind)
        model = wrap(module)
        if kind == "simclr":
            views = {"view1": data["view1"][sl], "view2": data["view2"][sl]}
        elif kind.startswith("moco"):
            views = {"query": data["view1"][sl], "key": data["view2"][sl]}
        else:
            views = {"global": data["global"][:, sl], "local": data["local"][:, sl]}
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
        out = model(views)
        out["loss"].backward()
        entry = {"loss": out["loss"].detach(), "grads": _grads(module)}
        opt.step()
        module.after_step()
        if kind == "swav_queue":
            # The first step filled the queue with the global batch; the second one uses it.
            opt.zero_grad()
            out = model(views)
            assert out["queue_in_use"] == 1.0
            out["loss"].backward()
            entry = {"loss": out["loss"].detach(), "grads": _grads(module), "queue": module.queue.clone()}
        if kind.startswith("moco"):
            entry["queue"] = module.queue.clone()
            entry["queue_ptr"] = module.queue_ptr.clone()
            entry["key_params"] = [p.detach().clone() for p in module.key_parameters()]
        res[kind] = entry
    return res


def _worker(rank: int, world: int, tmpdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        assert D.world_size() == world and D.rank() == rank and D.rank_offset(B) == rank * B
        torch.save(run_cases(rank, world, B), os.path.join(tmpdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmpdir = str(tmp_path_factory.mktemp("gloo"))
    mp.spawn(_worker, args=(WORLD, tmpdir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmpdir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    assert not dist.is_initialized()
    return run_cases(0, 1, WORLD * B)


def _close(a, b, what):
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"{what}: max |diff| {(a - b).abs().max().item():.3g}"


def test_global_batch_norm_two_ranks_equal_batch_norm_in_one_process(ranks, single):
    ref = single["global_bn"]
    for r, res in enumerate(ranks):
        sl = slice(r * B, (r + 1) * B)
        got = res["global_bn"]
        _close(got["y"], ref["y"][sl], f"rank {r} output")
        # the reference loss is a mean over WORLD·B; each rank's over B: DDP averages, inputs don't
        _close(got["x_grad"], ref["x_grad"][sl] * WORLD, f"rank {r} input gradient")
        for k in ref["grads"]:
            _close(got["grads"][k], ref["grads"][k], f"rank {r} grad {k}")
        for a, b in zip(got["running"], ref["running"]):
            _close(a.float(), b.float(), f"rank {r} running statistics")


def test_global_batch_norm_is_batch_norm_outside_a_process_group():
    torch.manual_seed(0)
    bn, x = nn.BatchNorm2d(4), torch.randn(6, 4, 5, 5)
    g = convert_sync_batchnorm(nn.Sequential(bn), "cpu")[0]
    assert isinstance(g, GlobalBatchNorm)
    assert torch.equal(g.weight, bn.weight) and g.weight is not bn.weight
    _close(g(x), bn(x), "train-mode output")
    g.eval()
    _close(g(x), bn.eval()(x), "eval-mode output (running statistics)")


def test_single_process_helpers_are_no_ops():
    x = torch.randn(3, 2, requires_grad=True)
    assert D.world_size() == 1 and D.rank() == 0 and D.rank_offset(5) == 0
    assert D.gather_with_grad(x) is x
    assert D.gather_for_global_loss(x) is x
    assert torch.equal(D.concat_all_gather_no_grad(x), x.detach())
    assert torch.equal(D.all_reduce_mean(x), x.detach())


def test_gather_with_grad_gives_the_gradient_of_the_summed_losses(ranks):
    w = _data(WORLD * B)["weights"]
    for r, res in enumerate(ranks):
        y, grad = res["gather"]
        expected_y = torch.cat([torch.arange(B * 3, dtype=torch.float32).view(B, 3) + 100 * s for s in range(WORLD)])
        assert torch.equal(y, expected_y)
        # Rank s's loss is Σ (s+1)·w ⊙ y, so d(Σ_s L_s)/dx_r = Σ_s (s+1)·w[rows of r].
        expected = sum((s + 1) for s in range(WORLD)) * w[r * B:(r + 1) * B]
        _close(grad, expected, f"gather grad rank {r}")


def test_gather_for_global_loss_scales_the_local_slice_by_the_world_size(ranks):
    # Every rank computes L = (1/W)·Σ w ⊙ y over the whole gathered y; its backward must give
    # W·dL/dx_r = w[rows of r] (what gather_with_grad's all_reduce would give for Σ_r L_r).
    w = _data(WORLD * B)["weights"]
    for r, res in enumerate(ranks):
        y, grad = res["gather_global"]
        assert torch.equal(y, torch.cat([torch.arange(B * 3, dtype=torch.float32).view(B, 3) + 100 * s
                                         for s in range(WORLD)]))
        _close(grad, w[r * B:(r + 1) * B], f"gather_for_global_loss grad rank {r}")


def test_nt_xent_two_ranks_equal_one_process(ranks, single):
    # Every rank computes the loss of the whole global batch (its backward then needs no collective).
    for r, res in enumerate(ranks):
        _close(res["nt_xent"][0], single["nt_xent"][0], f"nt_xent loss on rank {r}")
    loss = torch.stack([res["nt_xent"][0] for res in ranks]).mean()
    _close(loss, single["nt_xent"][0], "nt_xent loss")
    # Each rank's backward holds d(Σ_r L_r)/dz_local; the single loss is the mean over ranks.
    g1 = torch.cat([res["nt_xent"][1] for res in ranks]) / WORLD
    g2 = torch.cat([res["nt_xent"][2] for res in ranks]) / WORLD
    _close(g1, single["nt_xent"][1], "nt_xent grad z1")
    _close(g2, single["nt_xent"][2], "nt_xent grad z2")


def test_sinkhorn_two_ranks_equal_one_process(ranks, single):
    q = torch.cat([res["sinkhorn"] for res in ranks])
    _close(q, single["sinkhorn"], "sinkhorn assignments")


@pytest.mark.parametrize("kind", ["simclr", "moco_none", "moco_shuffle", "swav", "swav_queue"])
def test_objective_loss_and_gradients_two_ranks_equal_one_process(ranks, single, kind):
    loss = torch.stack([res[kind]["loss"] for res in ranks]).mean()
    _close(loss, single[kind]["loss"], f"{kind} loss")
    ref = single[kind]["grads"]
    assert ref, f"{kind}: no gradients in the single-process run"
    for r, res in enumerate(ranks):
        assert res[kind]["grads"].keys() == ref.keys()
        for name, g in res[kind]["grads"].items():      # DDP averaged them: equal on every rank
            _close(g, ref[name], f"{kind} grad {name} rank {r}")


def test_swav_queue_is_the_global_batch_on_every_rank(ranks, single):
    for r, res in enumerate(ranks):
        _close(res["swav_queue"]["queue"], single["swav_queue"]["queue"], f"swav queue rank {r}")


@pytest.mark.parametrize("kind", ["moco_none", "moco_shuffle"])
def test_moco_queue_and_key_encoder_after_a_step_equal_one_process(ranks, single, kind):
    for r, res in enumerate(ranks):
        _close(res[kind]["queue"], single[kind]["queue"], f"{kind} queue rank {r}")
        assert int(res[kind]["queue_ptr"]) == int(single[kind]["queue_ptr"]) == WORLD * B
        for a, b in zip(res[kind]["key_params"], single[kind]["key_params"]):
            _close(a, b, f"{kind} key encoder rank {r}")

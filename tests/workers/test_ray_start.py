"""The private Ray instance started early on its own thread (``gelato pretrain`` does, beside
Prefect's start-up): a failure reaches whoever claims it, and nothing is left pending."""
from __future__ import annotations

import pytest

from workers.pretrain.ray_internals import ray_start

pytestmark = pytest.mark.slow  # a private Ray instance


def test_a_failed_early_start_is_raised_by_claim_and_cleared(monkeypatch):
    import ray

    def refuse(**kwargs):  # stands in for a ray.init that cannot start (e.g. no free port)
        raise RuntimeError("ray.init refused")

    monkeypatch.setattr(ray, "init", refuse)
    ray_start.start_early(2)
    assert ray_start.pending()
    early = ray_start._early
    with pytest.raises(RuntimeError, match="ray.init refused"):
        ray_start.claim()
    assert not ray_start.pending()
    early.thread.join(5)
    assert not early.thread.is_alive()  # the thread that held the instance has ended
    with pytest.raises(RuntimeError, match="no early Ray start"):
        ray_start.claim()

"""Prefect flow ``pretrain``: one task that submits the Ray Train job and watches it.

No Prefect retries here: a worker that dies is restarted by Ray's ``FailureConfig`` from the last
checkpoint, and a config error is deterministic.
"""
from __future__ import annotations

from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.credentials import resolve as resolve_credentials
from workers.config import PretrainConfig
from workers.pretrain.launch import launch


@task(cache_policy=NONE, task_run_name="pretrain-{config.objective}")
def pretrain_task(run: str, config: PretrainConfig, address: Optional[str], overwrite: bool,
                  progress_bar: bool, ray_dashboard: bool = False) -> dict:
    log = get_run_logger()
    return launch(run, config, address=address, overwrite=overwrite, progress_bar=progress_bar, log=log.info,
                  dashboard=ray_dashboard)


@flow(name="pretrain")
def pretrain_flow(run: str, config: PretrainConfig, address: Optional[str] = None, overwrite: bool = False,
                  progress_bar: bool = True, ray_dashboard: bool = False) -> dict:
    """Pretrain on ``run``'s shards with ``config`` (its credentials are left out of the flow run's
    stored parameters; a Secret block it names is resolved here)."""
    cfg = config.model_copy(update={"storage_options": resolve_credentials(config.storage_options)})
    return pretrain_task(run, cfg, address, overwrite, progress_bar, ray_dashboard)

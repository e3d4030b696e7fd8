"""``gelato deploy`` and ``gelato serve``: the deployments of ``prefect.yaml``, one source of truth.

``deploy`` registers every deployment with the Prefect API (``PREFECT_API_URL``) on a process work
pool (created if missing) so a ``prefect worker`` runs them; ``serve`` runs them from this process
with their schedules, the lightest way to get a nightly pipeline.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_deployments(path: Optional[str] = None, only: Optional[list[str]] = None) -> list[dict[str, Any]]:
    path = path or os.path.join(REPO, "prefect.yaml")
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    deps = doc.get("deployments") or []
    if only:
        unknown = set(only) - {d["name"] for d in deps}
        if unknown:
            raise ValueError(f"{path}: no deployment named {sorted(unknown)}; have {[d['name'] for d in deps]}")
        deps = [d for d in deps if d["name"] in only]
    for d in deps:
        if "name" not in d or "entrypoint" not in d:
            raise ValueError(f"{path}: every deployment needs a name and an entrypoint (got {d})")
    return deps


def load_flow(entrypoint: str):
    """``flows/pipeline.py:pipeline_flow`` → the flow object."""
    from prefect.flows import load_flow_from_entrypoint

    # Loaded from its file path (not imported as a module) so the deployment records an entrypoint
    # the runner can load again in the process that executes the run.
    return load_flow_from_entrypoint(os.path.join(REPO, entrypoint))


def _cron(d: dict) -> Optional[str]:
    scheds = d.get("schedules") or []
    return scheds[0].get("cron") if scheds else None


def serve(path: Optional[str] = None, only: Optional[list[str]] = None) -> None:
    """Serve the deployments from this process (blocks); scheduled runs and triggered runs execute here."""
    from prefect import serve as prefect_serve

    deployments = [load_flow(d["entrypoint"]).to_deployment(name=d["name"], parameters=d.get("parameters") or {},
                                                            cron=_cron(d), description=d.get("description"))
                   for d in read_deployments(path, only)]
    prefect_serve(*deployments)


def deploy(path: Optional[str] = None, only: Optional[list[str]] = None, work_pool: Optional[str] = None) -> list[str]:
    """Register the deployments on a process work pool; returns their ids."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    ids = []
    deps = read_deployments(path, only)
    pools = {work_pool or (d.get("work_pool") or {}).get("name") or "gelato-process" for d in deps}

    async def ensure_pools():
        async with get_client() as client:
            for pool in pools:
                try:
                    await client.read_work_pool(pool)
                except ObjectNotFound:
                    await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))

    asyncio.run(ensure_pools())
    for d in deps:
        # The code stays where it is: the deployment records this checkout's path, which a process
        # worker on this machine (or one with the same checkout) runs from.
        dep = load_flow(d["entrypoint"]).to_deployment(
            name=d["name"], work_pool_name=work_pool or (d.get("work_pool") or {}).get("name") or "gelato-process",
            parameters=d.get("parameters") or {}, cron=_cron(d), description=d.get("description"))
        ids.append(str(dep.apply()))
    return ids

"""The private local Ray instance of one ``gelato pretrain`` command, optionally started early.

With no cluster address, pretraining starts a Ray instance of its own that lives and dies with the
command. ``ray.init`` takes ~5 s, mostly waiting on the processes it starts; the ``gelato
pretrain`` command spends a similar time starting Prefect's temporary API server before the flow
reaches ``launch()``. :func:`start_early` runs ``ray.init`` on a thread of its own meanwhile, and
``launch()`` then takes that instance over (:func:`claim`) instead of starting one.

The thread stays alive until :func:`shutdown`: Ray starts its processes with
``PR_SET_PDEATHSIG``, which fires when the *thread* that started them ends, so a ``ray.init``
thread that returned would take the instance down with it.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Optional

_lock = threading.Lock()
_early: Optional["_EarlyStart"] = None


def private_init(num_cpus: int, dashboard: bool = False) -> None:
    """``ray.init`` for a private instance: no preemption watcher (no node of a private instance
    can be preempted; Ray's processes inherit the setting, this process's environment is left
    as it was), no idle workers prestarted (Ray Train starts its own actors), the dashboard only
    on request (it is ten more processes). Ray's processes, the training workers included, start with
    glibc's malloc set to keep the memory one step frees for the next (``MALLOC_ENV``,
    ``workers/hardware.py``: ~9 % faster bf16 steps on 2 cores), unless the user set those variables.
    The workers' output stays in Ray's session logs
    (``/tmp/ray/session_latest/logs``) instead of interleaving with the progress bar: what the
    command reports comes from ``metrics.jsonl``, and a failure is raised here with its traceback."""
    import ray

    from workers.hardware import MALLOC_ENV

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    inherited = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", **MALLOC_ENV}
    ours = [k for k in inherited if k not in os.environ]
    os.environ.update({k: inherited[k] for k in ours})
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=False,
                 _system_config={"prestart_worker_first_driver": False})
    finally:
        for k in ours:
            os.environ.pop(k, None)


class _NotMainThread(logging.Filter):
    """Drops Ray's warning that a non-main thread cannot set a SIGTERM handler: the default
    action (the process ends, and Ray's processes with it) is what this command wants."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not the main thread" not in record.getMessage()


class _EarlyStart:
    def __init__(self, num_cpus: int, dashboard: bool):
        self.ready, self.done = threading.Event(), threading.Event()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(num_cpus, dashboard), name="gelato-ray-init",
                                       daemon=True)

    def _run(self, num_cpus: int, dashboard: bool) -> None:
        quiet = _NotMainThread()
        log = logging.getLogger("ray._private.worker")
        log.addFilter(quiet)
        try:
            private_init(num_cpus, dashboard)
        except BaseException as e:  # handed to whoever claims the instance
            self.error = e
        finally:
            log.removeFilter(quiet)
            self.ready.set()
        self.done.wait()  # keep Ray's processes alive: they die with this thread


def start_early(num_cpus: int, dashboard: bool = False) -> None:
    """Start the private instance on a background thread; :func:`claim` waits for it."""
    global _early
    with _lock:
        if _early is not None:
            return
        import ray

        if ray.is_initialized():
            return
        _early = _EarlyStart(num_cpus, dashboard)
        _early.thread.start()
    atexit.register(shutdown)


def pending() -> bool:
    """Whether an early start was made and not yet shut down."""
    return _early is not None


def claim() -> None:
    """Wait for the early start; raise its error, if it failed."""
    early = _early
    if early is None:
        raise RuntimeError("no early Ray start to claim")
    early.ready.wait()
    if early.error is not None:
        shutdown()
        raise early.error


def shutdown() -> None:
    """``ray.shutdown()``, then let the early-start thread (if any) end."""
    global _early
    import ray

    with _lock:
        early, _early = _early, None
    if ray.is_initialized():
        ray.shutdown()
    if early is not None:
        early.done.set()
        early.thread.join(10)


__all__ = ["claim", "pending", "private_init", "shutdown", "start_early"]

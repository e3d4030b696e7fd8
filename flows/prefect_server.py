"""Prefect's temporary API server, started at the top of a ``gelato`` command instead of on first use.

With no ``PREFECT_API_URL``, the first flow of a process starts a temporary server: a ``uvicorn``
subprocess that imports Prefect's server and opens its database (~5 s here), while the command
waits. Nothing of that needs the command's own work, so :func:`start_early` spawns the same
subprocess (the same command line and environment as ``prefect.server.api.server.
SubprocessASGIServer``) as soon as the command has parsed its arguments, points this process at
it through ``PREFECT_API_URL``, and the server boots while the command imports torch, checks its
inputs and starts Ray. :func:`wait_ready` is called just before the first flow; the server stops
with the command. Without this module nothing changes: Prefect starts its own server as before.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

_proc: Optional[subprocess.Popen] = None
_url: Optional[str] = None


def _prefect_dir() -> Optional[str]:
    spec = importlib.util.find_spec("prefect")  # locates the package without importing it
    return os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else None


def start_early() -> Optional[str]:
    """Spawn the temporary server now (unless an API is configured); returns its API URL or None."""
    global _proc, _url
    if _proc is not None or os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return _url  # an API is configured, or Prefect is already loaded here (in-process use, tests)
    app_dir = _prefect_dir()
    if app_dir is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
    _proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", os.path.join(app_dir, "prefect"),
                              "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                              "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = _url
    atexit.register(stop)
    return _url


def wait_ready(timeout: float = 60.0) -> None:
    """Block until the early server answers its health check; if it died, fall back to Prefect's own."""
    global _proc, _url
    if _proc is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _proc.poll() is not None:  # it exited (a port taken meanwhile): let Prefect start its own
            if os.environ.get("PREFECT_API_URL") == _url:
                os.environ.pop("PREFECT_API_URL")
            _proc, _url = None, None
            return
        try:
            with urllib.request.urlopen(f"{_url}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"Prefect's temporary server at {_url} did not answer within {timeout:.0f} s")


def stop() -> None:
    """Stop the early server, and stop pointing this process at it."""
    global _proc, _url
    if _proc is not None:
        _drain_prefect_services()  # logs and events still queued for this server, before it goes
    if _url is not None and os.environ.get("PREFECT_API_URL") == _url:
        os.environ.pop("PREFECT_API_URL")
    _url = None
    if _proc is not None:
        _proc.terminate()
        try:
            _proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _proc.kill()
            _proc.wait()
        _proc = None


def _drain_prefect_services(timeout: float = 5.0) -> None:
    """Send what Prefect's log and event workers still hold; otherwise they try after the server
    stopped and print "--- Error logging to API --- All connection attempts failed" at exit."""
    import sys

    for module, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        if module in sys.modules:
            try:
                getattr(sys.modules[module], name).drain_all(timeout=timeout)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

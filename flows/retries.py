"""Retry policy shared by the flows: retry I/O, never a deterministic failure.

Prefect calls ``retry_condition_fn(task, task_run, state)`` after a failed attempt; we retry only
when the exception is an I/O or network error (S3 hiccups, a dropped connection), so a config
error or a corrupt source fails at once instead of three times.
"""
from __future__ import annotations

import errno

IO_ERRORS = (OSError, ConnectionError, TimeoutError)


def is_io_error(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # deterministic: retrying will not make the file appear
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return False  # a full or read-only disk stays so for the seconds a retry waits
    if isinstance(exc, IO_ERRORS):
        return True
    name = type(exc).__name__
    return name in {"ClientError", "EndpointConnectionError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ServerDisconnectedError", "ClientConnectorError", "ResponseStreamingError"}


def retry_on_io(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # the failed attempt's exception
        return is_io_error(exc)
    return False

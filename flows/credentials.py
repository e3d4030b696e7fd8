"""Credentials held by Prefect: a Secret block named in ``storage_options`` (``prefect_secret: NAME``).

A scheduled deployment's parameters live in Prefect's database, so they must not carry
credentials (``workers.credentials`` leaves them out of every serialised config). Two
Prefect-native places hold them instead: the work pool worker's environment (the AWS variables,
read by botocore as for any command), or a Secret block whose value is a JSON object of s3fs
options, e.g. ``{"key": "...", "secret": "..."}``, named by ``storage_options.prefect_secret``
and resolved here, in the flow, at run time.
"""
from __future__ import annotations

import json
from typing import Optional

from workers.credentials import BLOCK, StorageOptions
from workers.storage import StorageError


def resolve(options: Optional[StorageOptions]) -> StorageOptions:
    """``options`` with the credentials of the Secret block it names, if any (explicit ones win)."""
    options = StorageOptions(options)
    name = options.get(BLOCK)
    if not name:
        return options
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as e:  # Prefect's error for a block that does not exist
        raise StorageError(f"storage_options.{BLOCK}: no Prefect Secret block named {name!r} ({e}); create it "
                           f"with prefect.blocks.system.Secret(value={{'key': ..., 'secret': ...}}).save({name!r})") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise StorageError(f"Prefect Secret block {name!r} must hold a JSON object of s3fs options "
                               "(key, secret, token, ...)") from None
    if not isinstance(value, dict):
        raise StorageError(f"Prefect Secret block {name!r} must hold a JSON object of s3fs options (key, secret, ...)")
    return options.with_secrets(value, source=f"Prefect Secret block {name!r}")

"""One code path for local disk and S3: run URIs opened through fsspec.

A run URI is a local path (``runs/demo``) or ``s3://bucket/prefix``. S3 endpoint and credentials
come from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``...) or from explicit ``storage_options`` (the same
keyword arguments s3fs takes), so the same command works against AWS, MinIO or moto.

s3fs instances are not fork-safe: every process (DataLoader worker, Ray worker) builds its own
through :func:`filesystem`, which never caches across processes.
"""
from __future__ import annotations

import os
import posixpath
import threading
from dataclasses import dataclass, field
from typing import Any

import fsspec

from workers.credentials import StorageOptions


class StorageError(RuntimeError):
    """The run location cannot be used (missing path or bucket, bad credentials)."""


@dataclass(frozen=True)
class RunLocation:
    """Where a run lives: ``uri`` plus the fsspec storage options that open it (credentials in them
    are :class:`~workers.credentials.Secret`: printing a location never shows them)."""

    uri: str
    storage_options: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self):
        if not isinstance(self.storage_options, StorageOptions):
            object.__setattr__(self, "storage_options", StorageOptions(self.storage_options))

    @staticmethod
    def normalise(uri: str) -> str:
        """The one form of a run URI every process agrees on: ``s3://...`` as given, a local path
        made absolute (Ray workers and Prefect tasks run in other working directories)."""
        return uri if "://" in uri else os.path.abspath(uri)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> str:
        if self.is_s3:
            return posixpath.join(self.uri.rstrip("/"), *parts)
        return os.path.join(self.uri, *parts)

    def fs(self) -> fsspec.AbstractFileSystem:
        return filesystem(self.uri, self.storage_options)

    def write_atomic(self, rel: str, data: bytes | str, fs: fsspec.AbstractFileSystem | None = None) -> None:
        """Write ``data`` to ``<run>/rel`` so that readers see the old file or the whole new one.

        Locally through a hidden temporary name in the same folder and ``os.replace``; on S3 an
        object only becomes visible when its upload completes, so the key is written in one PUT.
        """
        path = self.join(rel)
        data = data.encode() if isinstance(data, str) else data
        if self.is_s3:
            with (fs or self.fs()).open(path, "wb") as f:
                f.write(data)
            return
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def s3_options_from_env(storage_options=None) -> dict[str, Any]:
    """s3fs options (credentials revealed: for s3fs only): explicit ones win; ``AWS_ENDPOINT_URL``
    fills the endpoint when none is given.

    Keys and profiles are left to botocore's own credential chain (environment, profile files,
    instance roles), so they are never copied into our config or logs.
    """
    opts = StorageOptions(storage_options).reveal()
    opts.pop("prefect_secret", None)  # resolved by the flows layer into credentials, if it was given
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get("client_kwargs", {}):
        opts["endpoint_url"] = endpoint
    return opts


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """A fresh fsspec filesystem for ``uri`` (never a cached instance shared across forks)."""
    if uri.startswith("s3://"):
        import s3fs  # imported lazily: local runs never pay for botocore

        return s3fs.S3FileSystem(skip_instance_cache=True, **s3_options_from_env(storage_options))
    if "://" in uri and not uri.startswith("file://"):
        protocol = uri.split("://", 1)[0]
        return fsspec.filesystem(protocol, skip_instance_cache=True, **StorageOptions(storage_options).reveal())
    return fsspec.filesystem("file")


def _redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def check_writable(loc: RunLocation) -> None:
    """Fail before any work when the run location cannot be written, naming what is wrong.

    Local: the parent directory is created. S3: the bucket must exist and the credentials must
    allow listing it; the error names the bucket and the endpoint, never the secret.
    """
    if not loc.is_s3:
        try:
            os.makedirs(loc.uri, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create run directory {loc.uri!r}: {e.strerror}") from None
        return
    bucket = loc.uri[len("s3://"):].split("/", 1)[0]
    if not bucket:
        raise StorageError(f"run URI {loc.uri!r} names no bucket; use s3://bucket/prefix")
    opts = s3_options_from_env(loc.storage_options)
    endpoint = opts.get("endpoint_url") or opts.get("client_kwargs", {}).get("endpoint_url") or "AWS default endpoint"
    secrets = loc.storage_options.secret_values() + [os.environ.get("AWS_SECRET_ACCESS_KEY", "")]
    fs = loc.fs()
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise StorageError(f"S3 bucket {bucket!r} does not exist at {endpoint}; create it first") from None
    except PermissionError as e:
        raise StorageError(
            f"S3 access to bucket {bucket!r} at {endpoint} was denied: check AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY or the profile ({_redact(str(e), secrets)})") from None
    except Exception as e:  # botocore raises many kinds (NoCredentialsError, ClientError, ...)
        raise StorageError(
            f"cannot reach S3 bucket {bucket!r} at {endpoint}: {type(e).__name__}: "
            f"{_redact(str(e), secrets)}") from None

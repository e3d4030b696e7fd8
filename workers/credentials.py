"""Storage credentials that never leave memory: :class:`StorageOptions` and where credentials came from.

``storage_options`` are s3fs keyword arguments (``endpoint_url``, ``client_kwargs``, ``key``,
``secret``, ``token``, ``profile``...). Some of them are credentials. gelato writes configs into
the run (``config.yaml``, every checkpoint, ``backbone.pt``), hands them to Ray (the train loop's
config) and to Prefect (flow-run parameters, stored in its database). So the options travel as a
:class:`StorageOptions`, whose credential values are held in :class:`Secret` wrappers:

* printed (``repr``, ``str``, f-strings, logs) they read ``'***'``;
* serialised (pydantic ``model_dump``, JSON, YAML, Prefect parameters) they are *left out*, and a
  ``credentials`` entry says where they came from instead;
* only :meth:`StorageOptions.reveal` gives the real values, and only the code that opens the
  filesystem calls it (``workers.storage.filesystem``).

Reading options back from a file gelato wrote (an old checkpoint written before this module, a
``config.yaml``) goes through :func:`strip_secrets`: a secret found there is dropped, never used.
The credentials then come from the command at hand: its config file, the AWS environment, a
profile, or a Prefect Secret block (``prefect_secret: NAME``, resolved by the flows layer).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, Iterator, Optional

# s3fs / botocore / fsspec argument names whose values are credentials (compared lower-case).
SECRET_KEYS = frozenset({
    "key", "secret", "token", "password", "passwd", "access_key", "secret_key", "session_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "sse_customer_key",
    "client_secret", "account_key", "sas_token", "connection_string", "credentials_json",
})
NOTE = "credentials"           # the entry that says where credentials came from, in written configs
BLOCK = "prefect_secret"       # name of a Prefect Secret block holding credentials (flows resolve it)
MASK = "***"


class Secret:
    """A credential value: ``'***'`` wherever it is printed; :meth:`value` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: Any):
        self._value = value.value() if isinstance(value, Secret) else value

    def value(self) -> Any:
        return self._value

    def __repr__(self) -> str:
        return f"'{MASK}'"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", str(self._value)))

    def __reduce__(self):  # pickled only in memory (Ray's object store), never written by gelato
        return (Secret, (self._value,))


def _is_secret(name: str) -> bool:
    return str(name).lower() in SECRET_KEYS


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: Secret(v) if _is_secret(k) and v is not None else _wrap(v) for k, v in value.items()}
    return value


def _walk(value: Any, keep_secrets: bool) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(v, Secret):
                if keep_secrets:
                    out[k] = v.value()
            else:
                out[k] = _walk(v, keep_secrets)
        return out
    return copy.deepcopy(value)


def _secret_names(value: Any, prefix: str = "") -> list[str]:
    names = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(v, Secret):
                names.append(prefix + str(k))
            else:
                names += _secret_names(v, f"{prefix}{k}.")
    return names


def strip_secrets(raw: Any) -> dict:
    """Options read back from a file gelato wrote: credential values and the ``credentials`` note
    are dropped (a secret that an older version wrote is never used, nor kept)."""
    if not isinstance(raw, Mapping):
        return {}
    opts = _wrap({k: v for k, v in raw.items() if k != NOTE})
    return _walk(opts, keep_secrets=False)


class StorageOptions(Mapping):
    """s3fs keyword arguments with their credential values wrapped in :class:`Secret`.

    As a mapping it shows the options without their credentials (what may be written); ``reveal()``
    gives everything, for s3fs. It validates and serialises as a pydantic field type.
    """

    def __init__(self, options: Optional[Mapping] = None, source: Optional[str] = None):
        self._source = source  # where the credentials came from, when not from these options themselves
        if isinstance(options, StorageOptions):
            self._opts = copy.deepcopy(options._opts)
            self._source = source or options._source
            return
        raw = dict(options or {})
        raw.pop(NOTE, None)  # a note from a written config describes that run, not this one
        self._opts = _wrap(raw)

    # --- the mapping: public options only
    def _public(self) -> dict:
        return _walk(self._opts, keep_secrets=False)

    def __getitem__(self, key: str) -> Any:
        return self._public()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._public())

    def __len__(self) -> int:
        return len(self._public())

    def __bool__(self) -> bool:  # options that hold only credentials are still options
        return bool(self._opts)

    def __eq__(self, other) -> bool:
        if isinstance(other, StorageOptions):
            return self._opts == other._opts
        return isinstance(other, Mapping) and self._opts == _wrap(dict(other))

    def __repr__(self) -> str:
        return f"StorageOptions({self._opts!r})"

    __str__ = __repr__

    # --- what gelato uses
    def reveal(self) -> dict:
        """Every option with its real credential values: for the code that opens the filesystem only."""
        return _walk(self._opts, keep_secrets=True)

    def secret_names(self) -> list[str]:
        """Dotted names of the credentials given here (``key``, ``client_kwargs.aws_secret_access_key``)."""
        return _secret_names(self._opts)

    def secret_values(self) -> list[str]:
        """The credential values themselves, to redact them from error messages."""
        vals: list[str] = []

        def walk(v):
            if isinstance(v, Secret):
                vals.append(str(v.value()))
            elif isinstance(v, Mapping):
                for x in v.values():
                    walk(x)
        walk(self._opts)
        return [v for v in vals if v]

    def with_secrets(self, secrets: Mapping, source: Optional[str] = None) -> "StorageOptions":
        """These options plus credentials from elsewhere (``source``: a Prefect Secret block); explicit ones win."""
        merged = _walk(_wrap(dict(secrets)), keep_secrets=True) | self.reveal()
        merged.pop(BLOCK, None)
        return StorageOptions(merged, source=source)

    def written(self) -> dict:
        """What a file may hold: the options without credentials, and where the credentials come from."""
        out = self._public()
        note = credentials_source(self)
        if note:
            out[NOTE] = note
        return out

    # --- pydantic: validate from a mapping, serialise without credentials, a plain object in JSON schema
    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        def validate(value):
            if isinstance(value, StorageOptions):
                return value
            if value is None:
                return cls()
            if not isinstance(value, Mapping):
                raise ValueError("storage_options must be a mapping of s3fs options")
            return cls(value)

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.written()))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler):
        return {"type": "object", "additionalProperties": True}


def credentials_source(options: Optional[StorageOptions] = None, env: Optional[Mapping] = None) -> Optional[str]:
    """Where S3 credentials come from, in words (never the values); None when nothing points at S3."""
    env = os.environ if env is None else env
    names = options.secret_names() if options is not None else []
    if names:
        return f"{options._source or 'storage_options'} ({', '.join(names)}), not written"
    if options is not None and options.get(BLOCK):
        return f"Prefect Secret block {options.get(BLOCK)!r}"
    if options is not None and options.get("profile"):
        return f"AWS profile {options.get('profile')!r}"
    if env.get("AWS_ACCESS_KEY_ID"):
        return "AWS environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    if env.get("AWS_PROFILE"):
        return f"AWS profile {env['AWS_PROFILE']!r} (AWS_PROFILE)"
    if options:
        return "the default AWS credential chain (profile files, instance role)"
    return None

"""The run's ``manifest.json`` and where its shards live: what every stage reads first.

Ingest (``workers/ingest/``) writes ``manifest.json`` last, so an ingest is complete exactly when it
exists. It holds each split's shards (name, count, bytes, sha256), the classes and the images'
channels; ``FORMAT`` names the shard layout it describes.
"""
from __future__ import annotations

import json
from typing import Optional

from workers.storage import RunLocation

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
FORMAT = "gelato-shards/1"


def read_manifest(loc: RunLocation) -> Optional[dict]:
    """The run's manifest, or None before an ingest has finished."""
    fs = loc.fs()
    try:
        with fs.open(loc.join(MANIFEST), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None

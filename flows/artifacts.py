"""The run's plots in the Prefect UI.

The UI is a web page: the browser showing it must fetch each image itself. For a run on S3 each
plot is an image artifact whose URL is presigned (``s3fs.S3FileSystem.sign``), valid for
:data:`PRESIGN_SECONDS` (7 days, the longest a SigV4 URL may live), the expiry written in the
artifact's description; a later run of the flow publishes fresh ones. A local run's plots cannot be
shown by a browser (pages served over http may not load ``file://``): they are published as links
with the file's path, to open from the run directory.

A presigned URL carries the access key's ID (never the secret; with temporary credentials, their
session token) and lets whoever sees the artifact read that one plot until it expires.
``GELATO_PRESIGN_PLOTS=0`` publishes S3 plots as plain ``s3://`` links instead.
"""
from __future__ import annotations

import os
import re
import time

from prefect.artifacts import create_image_artifact, create_link_artifact

from workers.storage import RunLocation

PRESIGN_SECONDS = 7 * 24 * 3600


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, numbers and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_plots(loc: RunLocation, plots: dict[str, str], name: str) -> list[dict]:
    """One artifact per plot ({name: path relative to the run}); returns what was published."""
    out = []
    for plot, rel in plots.items():
        path, key = loc.join(rel), artifact_key("gelato", name, plot)
        if loc.is_s3 and os.environ.get("GELATO_PRESIGN_PLOTS", "1") != "0":
            url = loc.fs().sign(path, expiration=PRESIGN_SECONDS)
            until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + PRESIGN_SECONDS))
            create_image_artifact(image_url=url, key=key,
                                  description=f"{plot} plot of {loc.uri} ({rel}); presigned URL valid until {until}")
            out.append({"plot": plot, "kind": "image", "url": url, "expires": until})
        elif loc.is_s3:
            create_link_artifact(link=path, link_text=plot,
                                 key=key, description=f"{plot} plot of {loc.uri} (not presigned: GELATO_PRESIGN_PLOTS=0)")
            out.append({"plot": plot, "kind": "link", "url": path})
        else:
            create_link_artifact(link=f"file://{path}", link_text=f"{plot}: {path}", key=key,
                                 description=f"{plot} plot of {loc.uri}: a local file (a browser does not load "
                                             f"file:// inside the UI; open it from the run directory)")
            out.append({"plot": plot, "kind": "link", "url": f"file://{path}"})
    return out

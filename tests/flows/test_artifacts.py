"""Plots in the Prefect UI: an S3 run's are image artifacts whose presigned URLs a browser can
fetch (fetched here from the moto S3 server, without credentials); a local run's are links."""
from __future__ import annotations

import io
import time
import urllib.parse
import urllib.request

from prefect import flow
from prefect.artifacts import Artifact

from flows.artifacts import PRESIGN_SECONDS, publish_plots
from workers.storage import RunLocation


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@flow
def _publish(uri: str, plots: dict) -> list[dict]:
    return publish_plots(RunLocation(uri), plots, "Tiny Run")


def test_an_s3_runs_plots_are_images_a_browser_can_fetch(s3_bucket):
    uri = f"s3://{s3_bucket}/runs/tiny"
    RunLocation(uri).write_atomic("plots/confusion.png", _png())
    (out,) = _publish(uri, {"confusion": "plots/confusion.png"})
    assert out["kind"] == "image"
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(out["url"]).query))
    if "X-Amz-Expires" in query:  # SigV4: seconds from signing
        assert int(query["X-Amz-Expires"]) == PRESIGN_SECONDS
    else:                         # SigV2 (what this S3 server signs with): the moment it expires
        assert abs(int(query["Expires"]) - (time.time() + PRESIGN_SECONDS)) < 120
    assert "testing-secret" not in out["url"]  # the signature, never the secret
    with urllib.request.urlopen(out["url"], timeout=10) as r:  # no credentials: the signature is the access
        assert r.read() == _png()
    art = Artifact.get("gelato-tiny-run-confusion")
    assert art.type == "image" and art.data == out["url"] and "valid until" in art.description


def test_a_local_runs_plots_are_links_to_the_files(tmp_path):
    run = str(tmp_path / "run")
    RunLocation(run).write_atomic("plots/embedding.png", _png())
    (out,) = _publish(run, {"embedding": "plots/embedding.png"})
    assert out == {"plot": "embedding", "kind": "link", "url": f"file://{run}/plots/embedding.png"}
    art = Artifact.get("gelato-tiny-run-embedding")
    assert art.type == "markdown" and f"file://{run}/plots/embedding.png" in art.data

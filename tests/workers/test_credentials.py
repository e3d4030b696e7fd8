"""Credentials never written: the StorageOptions type, old checkpoints, and a real S3 run on moto with
IAM auth, scanned afterwards byte for byte (every object the run wrote, Prefect's database, Ray's logs)."""
from __future__ import annotations

import io
import json
import os
import re
import pickle
import subprocess
import sys
import time

import pytest
import torch
import yaml

from workers.config import PretrainConfig, load_config
from workers.credentials import StorageOptions, credentials_source, strip_secrets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "gelato-test-secret-8b1f2c"


def test_storage_options_hide_credentials_everywhere_but_reveal():
    opts = StorageOptions({"key": "AKIAEXAMPLE", "secret": SECRET, "endpoint_url": "http://e",
                           "client_kwargs": {"region_name": "x", "aws_session_token": "tok-123"}})
    shown = [repr(opts), str(opts), f"{opts}", json.dumps(dict(opts)), repr(dict(opts.items()))]
    for text in shown:
        assert SECRET not in text and "AKIAEXAMPLE" not in text and "tok-123" not in text
    assert "'***'" in repr(opts) and dict(opts) == {"endpoint_url": "http://e", "client_kwargs": {"region_name": "x"}}
    assert opts.reveal() == {"key": "AKIAEXAMPLE", "secret": SECRET, "endpoint_url": "http://e",
                             "client_kwargs": {"region_name": "x", "aws_session_token": "tok-123"}}
    assert opts.secret_names() == ["key", "secret", "client_kwargs.aws_session_token"]
    assert pickle.loads(pickle.dumps(opts)).reveal() == opts.reveal()  # Ray's object store carries them whole
    written = opts.written()
    assert "credentials" in written and "not written" in written["credentials"] and SECRET not in json.dumps(written)


def test_configs_serialise_without_credentials_and_say_where_they_came_from():
    c = load_config(None, [f"storage_options={{key: AKIAEXAMPLE, secret: {SECRET}, endpoint_url: http://e}}"])
    for text in (c.to_yaml(), json.dumps(c.model_dump(mode="json")), repr(c), str(c.model_dump())):
        assert SECRET not in text and "AKIAEXAMPLE" not in text
    assert yaml.safe_load(c.to_yaml())["storage_options"] == {
        "endpoint_url": "http://e", "credentials": "storage_options (key, secret), not written"}
    assert c.storage_options.reveal()["secret"] == SECRET  # still usable in memory
    # a written config read back has no credentials, and its note is not taken for an s3fs option
    back = PretrainConfig.from_written(yaml.safe_load(c.to_yaml()))
    assert back.storage_options.reveal() == {"endpoint_url": "http://e"}
    assert back.training_hash() == c.training_hash()


def test_a_secret_in_an_old_checkpoint_is_stripped_on_load(tmp_path):
    """backbone.pt written before this change held the config's secret in plain text."""
    from evalrun import TINY
    from workers.evaluate import checkpoint as ckpt
    from workers.model import build_objective
    from workers.storage import RunLocation

    config = load_config(None, TINY)
    old = config.model_dump(mode="json") | {"storage_options": {"key": "AKIAOLD", "secret": SECRET}}
    payload = {"backbone": build_objective(config, 1).backbone.state_dict(), "backbone_name": config.backbone,
               "backbone_params": config.backbone_params, "in_channels": 1, "image_channels": 1,
               "feature_dim": 32, "image_size": config.image_size, "objective": "simclr", "config": old, "steps": 1}
    path = tmp_path / "checkpoints" / "final" / "backbone.pt"
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    loaded = ckpt.load(RunLocation(str(tmp_path)), {"channels": 1}, None)
    assert loaded.config.storage_options.reveal() == {} and SECRET not in repr(loaded.config)
    assert strip_secrets({"key": "a", "client_kwargs": {"aws_secret_access_key": "b", "x": 1}}) == {"client_kwargs": {"x": 1}}


def test_credentials_source_names_the_source_never_the_value():
    assert credentials_source(StorageOptions(), {}) is None
    assert "AWS environment variables" in credentials_source(StorageOptions({"endpoint_url": "e"}),
                                                             {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert credentials_source(StorageOptions({"profile": "lab"}), {}) == "AWS profile 'lab'"
    assert credentials_source(StorageOptions({"prefect_secret": "s3"}), {}) == "Prefect Secret block 's3'"
    assert "AWS profile 'dev'" in credentials_source(StorageOptions({"endpoint_url": "e"}), {"AWS_PROFILE": "dev"})


# ----------------------------------------------------------------------------- a real run, scanned

def _scan(blobs: dict[str, bytes], needles: list[str]) -> list[str]:
    return [f"{name} holds {n[:6]}…" for name, data in blobs.items() for n in needles if n.encode() in data]


@pytest.mark.slow
def test_a_whole_pipeline_on_s3_writes_no_credential_anywhere(s3_with_iam, tmp_path):
    """`gelato run` on S3 with the keys only in the YAML's storage_options (no AWS variables): it works,
    and afterwards no byte of the key pair is in any object of the bucket, in Prefect's database (but
    for the key's ID inside the plots' presigned URLs), in Ray's session logs, or in what the command
    printed."""
    from imagegen import write_images

    url, key_id, secret, s3 = s3_with_iam
    write_images(tmp_path / "src", n_classes=3, per_class=24, size=16)
    cfg = {"name": "leak", "run": "s3://leak-test/runs/leak", "storage_options": {
               "key": key_id, "secret": secret, "client_kwargs": {"endpoint_url": url}},
           "ingest": {"source": str(tmp_path / "src"), "shard_size": 12, "val_fraction": 0.2},
           "pretrain": {"backbone": "small_cnn", "backbone_params": {"width": 8}, "image_size": 16,
                        "view": {"size": 16}, "batch_size": 16, "workers": 2, "loader_workers": 0, "steps": 4,
                        "checkpoint_every": 2, "knn_bank": 40, "knn_queries": 10, "optimizer": "sgd", "lr": 0.05,
                        "warmup_epochs": 0},
           "evaluate": {"protocols": ["probe", "knn"], "knn_k": 5, "probe_max_iter": 20}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "PREFECT_API_URL"}
    home = tmp_path / "prefect-home"
    env |= {"PREFECT_HOME": str(home), "RAY_AUTH_MODE": "disabled", "GELATO_TEST_MARK": f"leak-{time.time_ns()}"}
    done = subprocess.run([sys.executable, "-m", "gelato.cli", "run", "--config", str(tmp_path / "pipeline.yaml"),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    needles = [secret, key_id]
    blobs = {"stdout+stderr": (done.stdout + done.stderr).encode()}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="leak-test"):
        for obj in page.get("Contents", []):
            blobs[obj["Key"]] = s3.get_object(Bucket="leak-test", Key=obj["Key"])["Body"].read()
    names = set(blobs)
    for must in ("runs/leak/config.yaml", "runs/leak/checkpoints/final/backbone.pt", "runs/leak/report.json",
                 "runs/leak/metrics.jsonl", "runs/leak/manifest.json"):
        assert must in names, sorted(names)
    assert any("/checkpoints/checkpoint_" in n for n in names)  # Ray Train's checkpoints, on S3 too
    for root, _, files in os.walk(home):  # Prefect's database and logs (flow-run parameters live there)
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                blobs[os.path.join(root, f)] = fh.read()
    assert any(n.endswith(".db") for n in blobs), "Prefect's database was not where the test looked"
    ray_logs = "/tmp/ray/session_latest/logs"
    for root, _, files in os.walk(ray_logs):
        for f in files:
            try:
                with open(os.path.join(root, f), "rb") as fh:
                    blobs[os.path.join(root, f)] = fh.read()
            except OSError:
                pass
    # The plots' image artifacts hold presigned URLs (flows/artifacts.py): a signature and, as AWS
    # requires, the access key's ID, which is all that may appear, and only there; the secret nowhere.
    for name, data in blobs.items():
        if re.search(r"\.db(-wal|-journal)?$", name):  # the database and its write-ahead log
            blobs[name] = re.sub(rb"(AWSAccessKeyId=|X-Amz-Credential=)" + re.escape(key_id.encode()), rb"\1<id>", data)
    assert _scan(blobs, needles) == []
    assert any(b"AWSAccessKeyId=<id>" in v or b"X-Amz-Credential=<id>" in v for k, v in blobs.items() if k.endswith(".db"))
    # the scan sees what it should: the endpoint is in config.yaml, the run's URI in Prefect's database
    assert _scan({"config.yaml": blobs["runs/leak/config.yaml"]}, [url])
    assert _scan({k: v for k, v in blobs.items() if k.endswith(".db")}, ["s3://leak-test/runs/leak"])
    # what the run wrote says where the credentials came from, and a checkpoint loads without them
    written = yaml.safe_load(blobs["runs/leak/config.yaml"])
    assert written["storage_options"]["credentials"].startswith("storage_options (key, secret)")
    payload = torch.load(io.BytesIO(blobs["runs/leak/checkpoints/final/backbone.pt"]), weights_only=True)
    assert "key" not in payload["config"]["storage_options"]

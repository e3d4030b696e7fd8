"""Deployments for real: a ``prefect server`` on 127.0.0.1 with a temporary PREFECT_HOME,
``gelato deploy`` registers prefect.yaml's deployments, ``gelato serve`` executes a run of the tiny
pipeline triggered through the API, on S3 (moto with IAM auth) whose keys live only in a Prefect
Secret block; the run completes, its artifacts exist, and no key is in the flow run's parameters or
in what the run wrote. Everything started here is stopped here."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from conftest import free_port
from flows.deploy import read_deployments
from imagegen import write_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def test_repository_prefect_yaml_is_valid():
    deps = read_deployments()
    names = {d["name"] for d in deps}
    assert {"fashion-mnist-nightly", "moving-fashion-mnist-weekly", "imagenet-simclr-on-ray-cluster", "ingest",
            "pretrain", "evaluate"} <= names
    nightly = next(d for d in deps if d["name"] == "fashion-mnist-nightly")
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    from flows.deploy import load_flow
    from flows.pipeline import PipelineConfig

    for d in deps:
        load_flow(d["entrypoint"])  # every entrypoint imports
        if d["entrypoint"].endswith("pipeline_flow"):
            PipelineConfig(**d["parameters"]["config"])  # every pipeline deployment's parameters validate
    ray = next(d for d in deps if d["name"] == "imagenet-simclr-on-ray-cluster")
    # a cluster's GCS address, not Ray Client (ray://), which Ray's docs advise against for Ray Train
    address = ray["parameters"]["config"]["address"]
    assert not address.startswith("ray://") and address.endswith(":6379")


@pytest.fixture()
def prefect_server(tmp_path):
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", RAY_AUTH_MODE="disabled",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    for k in ("PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(k, None)
    proc = subprocess.Popen([os.path.join(BIN, "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("prefect server did not become healthy in 90 s")
                time.sleep(0.5)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.mark.slow
def test_deploy_then_serve_runs_the_tiny_pipeline_with_credentials_in_a_secret_block(tmp_path, prefect_server,
                                                                                  s3_with_iam):
    url, key_id, secret, s3 = s3_with_iam
    env = {k: v for k, v in prefect_server.items() if not k.startswith("AWS_")}  # the served runs get no keys
    write_images(tmp_path / "src" / "train", n_classes=2, per_class=30, size=16)
    write_images(tmp_path / "src" / "test", n_classes=2, per_class=8, size=16, seed=1)
    config = {"name": "served-tiny", "run": "s3://leak-test/served",
              "storage_options": {"prefect_secret": "gelato-s3", "client_kwargs": {"endpoint_url": url}},
              "ingest": {"source": str(tmp_path / "src"), "shard_size": 10, "val_fraction": 0.2},
              "pretrain": {"backbone": "small_cnn", "backbone_params": {"width": 8}, "image_size": 16,
                           "view": {"size": 16}, "batch_size": 16, "workers": 2, "loader_workers": 0, "steps": 4,
                           "checkpoint_every": 2, "knn_bank": 40, "knn_queries": 10, "optimizer": "sgd", "lr": 0.05},
              "evaluate": {"protocols": ["probe", "knn"], "knn_k": 5}}
    deployments = tmp_path / "prefect.yaml"
    deployments.write_text(yaml.safe_dump({"name": "gelato-test", "deployments": [
        {"name": "tiny", "entrypoint": "flows/pipeline.py:pipeline_flow", "work_pool": {"name": "gelato-test-pool"},
         "schedules": [{"cron": "0 3 * * *"}], "parameters": {"config": config, "progress_bar": False}}]}))
    gelato = os.path.join(BIN, "gelato")
    r = subprocess.run([gelato, "deploy", "--file", str(deployments)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def api(fn):
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            async with get_client() as client:
                return await fn(client)

    # the key pair goes into a Secret block, the Prefect-native place for it (README: "What gelato promises")
    import json

    from prefect.blocks.system import Secret

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        Secret(value=json.dumps({"key": key_id, "secret": secret})).save("gelato-s3")

    dep = asyncio.run(api(lambda c: c.read_deployment_by_name("pipeline/tiny")))
    assert dep.work_pool_name == "gelato-test-pool" and dep.parameters["config"]["name"] == "served-tiny"

    serve_log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([gelato, "serve", "--file", str(deployments)], env=env, cwd=REPO,
                             stdout=serve_log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(8)  # serve registers its deployment and starts polling
        run = asyncio.run(api(lambda c: c.create_flow_run_from_deployment(dep.id)))
        deadline = time.time() + 420
        state = None
        while time.time() < deadline:
            fr = asyncio.run(api(lambda c: c.read_flow_run(run.id)))
            state = fr.state
            if state is not None and state.is_final():
                break
            time.sleep(2)
        assert state is not None and state.is_completed(), \
            f"flow run ended {state}; serve said:\n" + (tmp_path / "serve.log").read_text()[-4000:]
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        arts = asyncio.run(api(lambda c: c.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gelato-results-served-tiny"])))))
        assert arts and arts[0].type == "table"
        report = s3.get_object(Bucket="leak-test", Key="served/report.md")["Body"].read().decode()
        assert "probe" in report
        written = yaml.safe_load(s3.get_object(Bucket="leak-test", Key="served/config.yaml")["Body"].read())
        assert written["storage_options"]["credentials"] == "Prefect Secret block 'gelato-s3' (key, secret), not written"
        runs = asyncio.run(api(lambda c: c.read_flow_runs()))
        params = json.dumps([r.parameters for r in runs], default=str)
        assert "leak-test/served" in params and secret not in params and key_id not in params
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)

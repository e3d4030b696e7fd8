"""Shared fixtures: a real S3 API on loopback (moto_server), image folders built on the fly, and one
torch thread for modules of tiny batches."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(extra_env=None):
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the test extras (pip install -e '.[test]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], env=dict(os.environ, **(extra_env or {})),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except urllib.error.HTTPError:  # any HTTP answer (403 with auth on) means it is up
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.2)
    return proc, url


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start ``moto_server`` on 127.0.0.1 (a real S3 HTTP API) and point the AWS environment at it.

    Mocked here: only the cloud account; every byte goes through s3fs/botocore over HTTP.
    """
    proc, url = _start_moto()
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-xyz",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(10)


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; yields its name."""
    import s3fs

    name = f"gelato-test-{int(time.time() * 1e6) % 10**12}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=s3_endpoint)
    fs.mkdir(name)
    yield name


@pytest.fixture()
def s3_endpoint_with_auth():
    """A second moto server that checks credentials (IAM auth on), for the wrong-credentials test."""
    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture()
def s3_with_iam():
    """moto_server enforcing IAM auth: one user with S3 rights, its key pair, and a bucket it owns.

    The key pair is made by moto's IAM API, so S3 answers 403 to any other credentials: a run that
    succeeds used exactly these (given only in the config's storage_options)."""
    import json

    import boto3

    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                           aws_secret_access_key="x")
        iam.create_user(UserName="gelato")
        iam.put_user_policy(UserName="gelato", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        keys = iam.create_access_key(UserName="gelato")["AccessKey"]
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=keys["AccessKeyId"],
                          aws_secret_access_key=keys["SecretAccessKey"])
        s3.create_bucket(Bucket="leak-test")
        yield url, keys["AccessKeyId"], keys["SecretAccessKey"], s3
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny batches: one intra-op thread is faster than two fighting over a busy machine (20 steps of
    a correspondence objective: 1.4 s on one thread, 25 s on two beside a training run). A module
    takes it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

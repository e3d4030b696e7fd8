"""The deployment files under ``infra/`` stay valid and agree with the code.

No Docker engine, kubectl or cloud account here: the YAML files are parsed and their required
fields checked (the Ray cluster file also against Ray's own cluster-launcher schema); every
``gelato STAGE ...`` command they name must parse with the real CLI parser, and every
``configs/...yaml`` they name must exist; the Dockerfile must build from the repository root
with the pinned PyTorch and install the project.
"""
from __future__ import annotations

import copy
import pathlib
import re
import shlex
import sys

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CLUSTER = INFRA / "ray" / "cluster-gpu.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob-pretrain.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
README = INFRA / "README.md"
INFRA_YAMLS = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
CONFIG_PATH = re.compile(r"(?<![\w./-])configs/[\w./-]+\.ya?ml")


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([\w.]+)$", d.replace(" ", ""))
        if m:
            out[m.group(1).lower()] = m.group(3)
    return out


def _docs(path: pathlib.Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _strings(node) -> list[str]:
    """Every string value anywhere in a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _comment_lines(path: pathlib.Path) -> list[str]:
    return [ln.split("#", 1)[1] for ln in path.read_text().splitlines() if ln.lstrip().startswith("#")]


def gelato_commands(text: str) -> list[list[str]]:
    """The words after ``gelato`` of each ``gelato STAGE ...`` command in a shell snippet: at the start
    of a command (after ``&&``, ``;``, ``|``, ``VAR=value`` assignments) or after ``--`` (``ray job submit ... --``)."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for segment in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(segment, comments=True)
            except ValueError:
                continue
            for i, w in enumerate(words):
                starts = all(re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", x) for x in words[:i])
                if w == "gelato" and i + 1 < len(words) and (starts or words[i - 1] == "--"):
                    out.append(words[i + 1:])
                    break
    return out


def _commands_in(path: pathlib.Path) -> list[list[str]]:
    texts = _comment_lines(path) if path.suffix in (".yaml", ".yml") else []
    if path.suffix in (".yaml", ".yml"):
        texts += [s for d in _docs(path) for s in _strings(d)]
    else:
        texts.append(path.read_text())
    return [c for t in texts for c in gelato_commands(t)]


def _stages() -> set[str]:
    import argparse

    from gelato.cli import build_parser

    return {name for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}


def _parse(words: list[str]):
    from gelato.cli import build_parser

    try:
        return build_parser().parse_args(words)
    except SystemExit:
        pytest.fail(f"`gelato {' '.join(words)}` does not parse with gelato.cli.build_parser() "
                    f"(unknown stage or option)")


def test_the_command_finder():
    assert gelato_commands("cd /opt/gelato && gelato pretrain --run r --config c.yaml") == \
        [["pretrain", "--run", "r", "--config", "c.yaml"]]
    assert gelato_commands("RAY_AUTH_MODE=token ray job submit --address http://h:8265 -- gelato ingest x --out y") == \
        [["ingest", "x", "--out", "y"]]
    assert gelato_commands("pip install . && gelato --help > /dev/null") == [["--help", ">", "/dev/null"]]
    assert gelato_commands("the gelato bet; ray start --head") == []


# --------------------------------------------------------------------------- all of infra/

def test_infra_has_the_files():
    for p in (CLUSTER, RAYJOB, DOCKERFILE, README):
        assert p.is_file(), f"{p.relative_to(ROOT)} is missing"


@pytest.mark.parametrize("path", INFRA_YAMLS, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", INFRA_YAMLS + [README], ids=lambda p: str(p.relative_to(INFRA)))
def test_named_gelato_commands_and_configs_exist(path):
    strict = path.suffix in (".yaml", ".yml")  # the README's prose may abbreviate ("gelato pretrain ...")
    for words in _commands_in(path):
        if words[0].startswith("-"):
            continue  # `gelato --help` and the like
        if strict:
            args = _parse(words)
            if args.stage == "pretrain" and args.config:
                from workers.config import load_config

                load_config(str(ROOT / args.config), args.overrides)
        else:
            stages = _stages()
            assert words[0] in stages, f"{path.name}: `gelato {words[0]}` is not a stage of the CLI ({sorted(stages)})"
    for ref in CONFIG_PATH.findall(path.read_text()):
        assert (ROOT / ref).is_file(), f"{path.name} names {ref}, which does not exist"


# --------------------------------------------------------------------------- Ray cluster launcher

@pytest.fixture(scope="module")
def cluster() -> dict:
    return _docs(CLUSTER)[0]


def test_cluster_required_fields(cluster):
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cluster, f"cluster-gpu.yaml: {key} is required"
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert cluster["docker"]["image"] and cluster["docker"]["container_name"]
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cluster["worker_start_ray_commands"])
    assert any(re.search(r"pip install\b.*gelato", c) for c in cluster["setup_commands"])


def _is_gpu_instance(instance_type: str) -> bool:
    return instance_type[:1] in ("p", "g")  # EC2's accelerated families: p4d, p5, g5, g6, ...


def test_cluster_head_is_cpu_only_and_gpu_workers_autoscale(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not _is_gpu_instance(head["node_config"]["InstanceType"])
    assert not head.get("resources", {}).get("GPU")
    workers = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    gpu = [v for v in workers.values() if _is_gpu_instance(v["node_config"]["InstanceType"])]
    assert gpu, "no GPU worker node type"
    for w in gpu:
        assert w["min_workers"] == 0 and 1 <= w["max_workers"] <= cluster["max_workers"]


def test_cluster_file_mounts_point_at_real_paths(cluster):
    for remote, local in cluster.get("file_mounts", {}).items():
        if not local.startswith("~"):  # ~/...: the user's own files (the Ray auth token)
            assert (ROOT / local).exists(), f"file_mounts {remote}: {local} does not exist (run from the repository root)"


def test_cluster_validates_against_rays_schema(cluster):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))  # defaults filled in, as `ray up` does


# --------------------------------------------------------------------------- KubeRay RayJob

@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _docs(RAYJOB)[0]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


def test_rayjob_required_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    rcs = spec["rayClusterSpec"]
    assert _containers(rcs["headGroupSpec"])
    assert isinstance(rcs["workerGroupSpecs"], list) and rcs["workerGroupSpecs"]
    for group in rcs["workerGroupSpecs"]:
        assert group["groupName"] and _containers(group)
    assert rcs["rayVersion"] == _pins()["ray"], "rayVersion must match the ray pinned in pyproject.toml"


def test_rayjob_runs_gelato_pretrain_on_enough_gpus(rayjob):
    spec = rayjob["spec"]
    commands = gelato_commands(spec["entrypoint"])
    assert len(commands) == 1 and commands[0][0] == "pretrain"
    args = _parse(commands[0])
    assert args.run.startswith("s3://")
    from workers.config import load_config

    config = load_config(str(ROOT / args.config), args.overrides)
    assert config.use_gpu
    gpus = sum(int(g.get("replicas", 1)) * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in spec["rayClusterSpec"]["workerGroupSpecs"] for c in _containers(g))
    assert gpus >= config.workers, f"the RayJob's worker pods hold {gpus} GPUs, the config asks for {config.workers}"


def test_rayjob_image_and_s3_credentials(rayjob, cluster):
    rcs = rayjob["spec"]["rayClusterSpec"]
    containers = _containers(rcs["headGroupSpec"]) + [c for g in rcs["workerGroupSpecs"] for c in _containers(g)]
    images = {c["image"] for c in containers}
    assert images == {cluster["docker"]["image"]}, "the RayJob and the cluster file run the same image"
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            assert "secretKeyRef" in env[key]["valueFrom"], f"{c['name']}: {key} comes from a Secret"


# --------------------------------------------------------------------------- Dockerfile

def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_from_and_installs_the_project():
    ins = _instructions()
    ops = [op for op, _ in ins if op not in ("ARG",)]
    assert ops[0] == "FROM", "the first instruction (after ARGs) must be FROM"
    base = dict(ins)["FROM"]
    assert re.match(r"(python:3\.11|rayproject/ray:)", base), base
    runs = " && ".join(rest for op, rest in ins if op == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), "the project is installed with `pip install .`"
    pins = _pins()
    for pkg in ("torch", "torchvision"):
        assert f"{pkg}=={pins[pkg]}" in runs, f"{pkg} pinned as in pyproject.toml ({pins[pkg]})"
    copied = [rest.split()[:-1] for op, rest in ins if op == "COPY"]
    assert any(src == ["configs/"] or src == ["configs"] for src in copied), "configs/ is copied into the image"


def test_dockerfile_copies_what_exists_and_the_build_context_keeps_it():
    ignore = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", "the ignore file starts from nothing and lists what the build needs"
    kept = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for op, rest in _instructions():
        if op != "COPY" or rest.startswith("--from"):
            continue
        for src in rest.split()[:-1]:
            if src.startswith("--"):
                continue
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository (the build context is its root)"
            assert src.rstrip("/") in kept, f"COPY {src}: excluded by {DOCKERIGNORE.name}"


# --------------------------------------------------------------------------- README

def test_readme_walks_from_laptop_to_cluster():
    text = README.read_text()
    for needle in ("RAY_ADDRESS=", "ray job submit --address http://", "--working-dir .",
                   "ray up infra/ray/cluster-gpu.yaml", "kubectl apply -f infra/kuberay/rayjob-pretrain.yaml",
                   "docker build -f infra/docker/Dockerfile -t gelato:latest ."):
        assert needle in text, f"infra/README.md should show `{needle}`"
    for ref in re.findall(r"infra/[\w./-]+\.(?:ya?ml|md)|infra/docker/Dockerfile", text):
        assert (ROOT / ref).is_file(), f"infra/README.md names {ref}, which does not exist"


def test_license_file_matches_pyproject_and_every_path_infra_readme_names_exists():
    import re
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    for rel in re.findall(r"^\| `([^`]+)` \|", README.read_text(), re.M):
        assert (INFRA / rel).resolve().exists(), f"infra/README.md names {rel}, which does not exist"

"""``gelato doctor``: what gelato will do on this machine, measured in a few seconds.

It reports the CPU (model, torch's capability, native bf16), the cores this process may use and
torch's threads, CUDA devices with their bf16 support, what ``precision: auto`` resolves to on
each device, and one short measured training step of the demo's model (SimCLR on a ResNet-18 of
width 32, 16 px views) in fp32 and in bf16, in image pairs/s for one worker thread, the way each
pretraining worker runs it. Then the threads each process of the demo will use, the versions of
the libraries gelato runs on, whether Fashion-MNIST is installed, and which AWS variables are set
(names only: a value is never printed). Nothing it checks is required: a missing part is reported,
never raised, and the exit code is 0.
"""
from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from typing import Callable, Optional

AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
LIBRARIES = ("torch", "torchvision", "ray", "prefect", "webdataset", "s3fs")
DEMO_CONFIG = "configs/pipeline_demo.yaml"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _demo_pretrain_config():
    """The demo's pretraining config (the file if this is a checkout, else the same settings)."""
    from workers.config import PretrainConfig, load_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, DEMO_CONFIG)
    if os.path.exists(path):
        import yaml

        with open(path) as f:
            return load_model(PretrainConfig, base=(yaml.safe_load(f) or {}).get("pretrain", {}))
    return PretrainConfig(objective_params={"temperature": 0.1}, view={"size": 16, "scale": [0.3, 1.0]})


def measure_step(precision: str, batch: int = 32, steps: int = 2, threads: int = 1, device: str = "cpu",
                 config=None) -> float:
    """Image pairs/s of the demo's SimCLR step (forward, backward, SGD) at ``precision``, channels_last.

    ``batch`` pairs per step, ``threads`` torch threads (one pretraining worker's share), median of
    ``steps`` timed steps after one warm-up step.
    """
    import torch

    from workers.model import build_objective

    config = config or _demo_pretrain_config()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        obj = build_objective(config, 1).to(device).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(obj.parameters(), lr=0.01)
        images = torch.randint(0, 256, (batch, 1, config.image_size, config.image_size), dtype=torch.uint8, device=device)
        gen = torch.Generator(device=device).manual_seed(0) if device != "cpu" else torch.Generator().manual_seed(0)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            views = obj.make_views(images, generator=gen)
            views = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v
                     for k, v in views.items()}
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                loss = obj(views)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device != "cpu":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        return batch / sorted(times)[len(times) // 2]
    finally:
        torch.set_num_threads(old)


def fashion_mnist_status() -> str:
    from workers.ingest.sources import FASHION_MNIST_DIRS, find_fashion_mnist

    try:
        return f"installed ({find_fashion_mnist(download=False)})"
    except Exception:  # noqa: BLE001 - reported, never raised
        return (f"not installed in {FASHION_MNIST_DIRS[0]} (make demo installs the Debian package "
                "dataset-fashion-mnist; or pass --data-root)")


def report(out: Callable[[str], None] = print, measure: bool = True) -> dict:
    """Print what gelato will do here; return the same facts as a dict (for tests and tools)."""
    facts: dict = {}

    def line(key: str, text: str, value=None) -> None:
        facts[key] = text if value is None else value
        out(f"  {key:<22} {text}")

    out("gelato doctor: what gelato will do on this machine")
    out("")
    out("machine")
    try:
        import torch

        from workers.hardware import capabilities, cpu_threads_allowed, resolve
    except Exception as e:  # noqa: BLE001
        line("torch", f"cannot import torch: {type(e).__name__}: {e}")
        return facts
    caps = capabilities("cpu")
    line("cpu", caps.cpu_model or "unknown")
    line("cpu capability", f"{caps.cpu_capability} (torch.backends.cpu.get_cpu_capability())", caps.cpu_capability)
    bf16 = ("native" + f" ({', '.join(caps.cpu_bf16_flags)})") if caps.native_bf16 else (
        "emulated: no avx512_bf16 / amx_bf16" if not caps.cpu_bf16_flags else
        f"emulated: {', '.join(caps.cpu_bf16_flags)} present but disabled (ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY)")
    line("cpu bf16", bf16, caps.native_bf16)
    cores = cpu_threads_allowed()
    line("cores", f"{cores} usable by this process ({os.cpu_count()} on the machine)", cores)
    line("torch threads", f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
         torch.get_num_threads())
    devices = ["cpu"]
    try:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        n_gpu = 0
    if n_gpu:
        gpus = []
        for i in range(n_gpu):
            c = capabilities(f"cuda:{i}")
            gpus.append(f"cuda:{i} {c.cuda_name} (bf16 {'native' if c.cuda_bf16 else 'no'})")
            devices.append(f"cuda:{i}")
        line("cuda", "; ".join(gpus), gpus)
    else:
        line("cuda", "no CUDA device" + ("" if torch.version.cuda else " (torch built without CUDA)"), [])
    out("")
    out("precision: auto resolves to")
    facts["auto"] = {}
    for d in devices:
        ex = resolve("auto", capabilities(d))
        facts["auto"][d] = ex.as_dict()
        out(f"  {d:<22} {ex.describe()}")
    if measure:
        out("")
        out("one pretraining step of the demo's model (SimCLR, ResNet-18/32, 16 px views, 1 thread per worker)")
        facts["step_pairs_per_s"] = {}
        for precision in ("fp32", "bf16"):
            try:
                rate = measure_step(precision)
                facts["step_pairs_per_s"][precision] = rate
                note = "" if precision == "fp32" or caps.native_bf16 else " (emulated bf16: what auto avoids)"
                out(f"  {precision:<22} {rate:7.1f} pairs/s per worker{note}")
            except Exception as e:  # noqa: BLE001 - reported, never raised
                out(f"  {precision:<22} could not measure: {type(e).__name__}: {e}")
        rates = facts["step_pairs_per_s"]
        if "fp32" in rates and "bf16" in rates:
            out(f"  {'bf16 / fp32':<22} {rates['bf16'] / rates['fp32']:.2f}x")
    out("")
    out("processes of the demo (make demo)")
    try:
        cfg = _demo_pretrain_config()
        facts["processes"] = {"pretrain_workers": cfg.workers, "threads_per_worker": cfg.cpus_per_worker,
                              "loader_processes_per_worker": cfg.loader_workers, "evaluation_threads": cores}
        line("pretraining", f"{cfg.workers} Ray workers x {cfg.cpus_per_worker} torch thread(s), each with "
                            f"{cfg.loader_workers} data-loader process(es) decoding shards (1 thread)")
        busy = cfg.workers * cfg.cpus_per_worker
        if busy > cores:
            out(f"  {'':<22} warning: {busy} training threads on {cores} cores oversubscribe this machine; "
                f"set pretrain.workers / cpus_per_worker so that their product is at most {cores}")
        line("evaluation", f"1 process, {cores} torch thread(s), one protocol at a time on CPU "
                           "(two at a time on a GPU)")
        glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
        line("allocator", "glibc malloc kept from giving each step's memory back (workers/hardware.py: mmap "
                          "threshold 32 MiB, trim threshold 1 GiB, one arena in a private Ray instance's workers)"
             if glibc else "not glibc: left as it is", "glibc-tuned" if glibc else "default")
    except Exception as e:  # noqa: BLE001
        line("pretraining", f"cannot read {DEMO_CONFIG}: {type(e).__name__}: {e}")
    out("")
    out("software")
    facts["versions"] = {}
    for name in LIBRARIES:
        facts["versions"][name] = v = _version(name)
        out(f"  {name:<22} {v}")
    out("")
    out("data and credentials")
    line("fashion-mnist", fashion_mnist_status())
    aws = [k for k in AWS_VARIABLES if os.environ.get(k)]
    line("aws variables set", ", ".join(aws) if aws else "none (S3 runs use the default profile, if any)", aws)
    return facts


def main(measure: bool = True, out: Optional[Callable[[str], None]] = None) -> int:
    report(out or print, measure)
    return 0

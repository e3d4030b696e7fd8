"""What this machine can do, and what ``precision: auto`` resolves to on it.

Reduced precision is a per-device decision, not a per-config one. On a CPU without native bf16
instructions, bf16 autocast is emulated: a 3×3 convolution (32 channels, forward and backward, one
thread) took 63 ms under bf16 against 16 ms in fp32 on an AVX2-only AMD EPYC, and the demo's
SimCLR ran at 14.7 pairs/s against ~166 in fp32 (issue 17). With AVX512_BF16 the same convolution
is ~2.5x *faster* in bf16. So ``auto`` resolves, when the run starts, on the device it runs on:

* CUDA: bf16 where the GPU supports it natively (Ampere and later), else fp16 with the grad scaler;
* CPU: bf16 only where the CPU has native bf16 (AVX512_BF16 or AMX-BF16, and oneDNN allowed to
  use it), else fp32;
* ``channels_last``: on CPU always (oneDNN's convolutions run NHWC natively: ~1.6x faster for the
  3×3 convolution above in fp32 and in bf16), on CUDA with bf16/fp16 (tensor cores want NHWC).

An explicit ``fp32``/``bf16``/``fp16`` is honoured; bf16 forced on a CPU without native bf16
comes with a warning saying how much slower it is and how to avoid it.

:func:`capabilities` reads the machine (``/proc/cpuinfo``, torch's CPU and CUDA queries);
:func:`resolve` is a pure function of a requested setting and stated capabilities, so it is
tested on machines we do not have. ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` makes an
AVX-512 machine behave like an AVX2-only one (torch's and oneDNN's kernels both), and
:func:`capabilities` honours them: that is how the AVX2 path is exercised here.
"""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal, Optional

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# Measured on an AVX2-only 2-core AMD EPYC (issue 17): the demo's SimCLR step in bf16 vs fp32.
EMULATED_BF16_SLOWDOWN = "about 10x"


@dataclass(frozen=True)
class Capabilities:
    """What a device offers that matters for precision. ``device``: "cpu" or "cuda"."""

    device: str = "cpu"
    cpu_model: str = ""
    cpu_capability: str = ""              # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    cpu_bf16_flags: tuple[str, ...] = ()  # avx512_bf16, amx_bf16 (x86) or bf16 (arm) in /proc/cpuinfo
    onednn_bf16: bool = True              # oneDNN may run bf16 kernels (false under ONEDNN_MAX_CPU_ISA=AVX2)
    cuda_name: Optional[str] = None
    cuda_bf16: bool = False               # native bf16 on the GPU (compute capability ≥ 8.0)

    @property
    def native_bf16(self) -> bool:
        """bf16 runs in hardware on this device."""
        if self.device == "cuda":
            return self.cuda_bf16
        return bool(self.cpu_bf16_flags) and self.onednn_bf16 and self.cpu_capability not in ("DEFAULT", "AVX2")


@dataclass(frozen=True)
class Execution:
    """How the networks of one run execute on one device, and why."""

    precision: Literal["fp32", "bf16", "fp16"]
    channels_last: bool
    requested: str                        # what the config asked for ("auto", "bf16", ...)
    device: str
    reason: str                           # one line a user can read
    warning: Optional[str] = None         # set when an explicit choice is slow on this device
    grad_scaler: bool = field(default=False)

    def describe(self) -> str:
        """``bf16 + channels_last (auto: CPU has native bf16 (avx512_bf16))``."""
        layout = " + channels_last" if self.channels_last else ""
        return f"{self.precision}{layout} ({self.requested}: {self.reason})"

    def as_dict(self) -> dict:
        return asdict(self)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def capabilities(device: str = "cpu") -> Capabilities:
    """Read this machine's capabilities for ``device`` ("cpu", "cuda" or "cuda:N")."""
    import torch

    flags = _cpu_flags()
    bf16_flags = tuple(sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"}))
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or unusual build: trust the flags
        onednn = True
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        cap = ""
    kind = device.split(":")[0]
    name, bf16 = None, False
    if kind == "cuda" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        bf16 = torch.cuda.get_device_capability(index) >= (8, 0)
    return Capabilities(kind, _cpu_model(), cap, bf16_flags, onednn, name, bf16)


def resolve(precision: str, caps: Capabilities, channels_last: Optional[bool] = None) -> Execution:
    """The execution a requested ``precision`` (and ``channels_last``: None = auto) gets on ``caps``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    cuda, warning = caps.device == "cuda", None
    if precision == "auto":
        if cuda:
            chosen = "bf16" if caps.cuda_bf16 else "fp16"
            reason = (f"{caps.cuda_name or 'the GPU'} supports bf16" if caps.cuda_bf16 else
                      f"{caps.cuda_name or 'the GPU'} has no native bf16: fp16 with the grad scaler")
        elif caps.native_bf16:
            chosen, reason = "bf16", f"CPU has native bf16 ({', '.join(caps.cpu_bf16_flags)})"
        else:
            chosen = "fp32"
            reason = (f"CPU ({caps.cpu_capability or 'unknown capability'}) has no native bf16; emulated bf16 "
                      f"would be {EMULATED_BF16_SLOWDOWN} slower")
    else:
        chosen, reason = precision, "set in the config"
        if precision == "fp16" and not cuda:
            raise ValueError("precision: fp16 needs a GPU (on CPU use auto, bf16 or fp32)")
        if precision == "bf16" and not cuda and not caps.native_bf16:
            warning = (f"precision bf16 on a CPU without native bf16 ({caps.cpu_model or 'this CPU'}, "
                       f"{caps.cpu_capability or 'unknown'}): bf16 is emulated here and runs {EMULATED_BF16_SLOWDOWN} "
                       f"slower than fp32. Use precision=auto (or fp32) to avoid it.")
        elif precision == "bf16" and cuda and not caps.cuda_bf16:
            warning = f"precision bf16 on {caps.cuda_name or 'a GPU'} without native bf16: it is emulated and slow; use auto"
    if channels_last is None:
        channels_last = True if not cuda else chosen != "fp32"
        layout_reason = "" if not channels_last else (
            "; channels_last: oneDNN's convolutions run NHWC" if not cuda else "; channels_last for tensor cores")
        reason += layout_reason
    return Execution(chosen, bool(channels_last), precision, caps.device, reason, warning,
                     grad_scaler=chosen == "fp16")


def resolve_here(precision: str, device: str = "cpu", channels_last: Optional[bool] = None) -> Execution:
    """:func:`resolve` on this machine's ``device``."""
    return resolve(precision, capabilities(device), channels_last)


def as_execution(execution, device: str = "cpu") -> Execution:
    """An :class:`Execution`, or a precision name ("auto", "fp32", ...) resolved on ``device``."""
    return execution if isinstance(execution, Execution) else resolve_here(str(execution), device)


def cpu_threads_allowed() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a container's
    ``--cpus``), not the machine's total."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return n


# glibc's malloc returns freed blocks to the system: a block over its mmap threshold is unmapped when
# freed, the main heap's free top is trimmed past the trim threshold, and a thread's own arena gives
# back each of its 64 MiB heaps as soon as it is empty. A training step frees and re-allocates the same
# activations every step, so each step pages them in again: the demo's SimCLR (ResNet-18 width 32,
# bf16, one thread per DDP rank) took ~9,000-60,000 minor page faults per rank per step and lost 5-10 %
# of its time in the kernel (bench/allocator.py). Fixed thresholds keep the freed memory for the next
# step, and one arena keeps a loop that runs on a thread other than the main one (Ray Train's) in the
# heap those thresholds govern. The process's peak memory is unchanged.
MMAP_THRESHOLD = 32 << 20     # glibc's largest allowed on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
# For processes gelato starts (a private Ray instance's workers): read by glibc when a process starts.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
              "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


@lru_cache(maxsize=1)
def keep_freed_memory() -> Optional[dict]:
    """Set glibc's malloc thresholds so that memory freed by one training step is reused by the next
    instead of being returned to the system and faulted in again. Process-wide, once; a no-op (None)
    where the C library is not glibc. Returns the thresholds set, and the arena limit this process
    started with (``MALLOC_ENV``: a loop on a thread of its own needs it to reuse memory)."""
    import ctypes

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3   # <malloc.h>
    ok = libc.mallopt(m_mmap_threshold, ctypes.c_int(MMAP_THRESHOLD)) == 1
    ok = libc.mallopt(m_trim_threshold, ctypes.c_int(TRIM_THRESHOLD)) == 1 and ok
    if not ok:
        return None
    return {"malloc": "glibc", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD,
            "arena_max": os.environ.get("MALLOC_ARENA_MAX")}  # set when the process started, or None


def cap_torch_threads() -> int:
    """Keep torch's intra-op threads within the cores this process may use; returns the count."""
    import torch

    n = min(torch.get_num_threads(), cpu_threads_allowed())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n

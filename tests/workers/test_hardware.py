"""``precision: auto``: the resolver on stated capabilities (machines we do not have), and on this one."""
from __future__ import annotations

import subprocess
import sys

import pytest

from workers.hardware import Capabilities, capabilities, resolve

AVX512_BF16 = Capabilities("cpu", "AMD EPYC", "AVX512", ("avx512_bf16",), True)
AMX = Capabilities("cpu", "Intel Xeon", "AVX512", ("amx_bf16", "avx512_bf16"), True)
AVX2 = Capabilities("cpu", "AMD EPYC", "AVX2", (), False)
AVX512_NO_BF16 = Capabilities("cpu", "Intel Xeon Skylake", "AVX512", (), True)  # AVX-512 but no bf16 unit
CAPPED = Capabilities("cpu", "AMD EPYC", "AVX2", ("avx512_bf16",), False)        # ONEDNN_MAX_CPU_ISA=AVX2
A100 = Capabilities("cuda", "x", "AVX512", (), True, "NVIDIA A100", True)
T4 = Capabilities("cuda", "x", "AVX2", (), True, "Tesla T4", False)


@pytest.mark.parametrize("caps, precision, layout", [
    (AVX512_BF16, "bf16", True), (AMX, "bf16", True),
    (AVX2, "fp32", True), (AVX512_NO_BF16, "fp32", True), (CAPPED, "fp32", True),
    (A100, "bf16", True), (T4, "fp16", True),
])
def test_auto_resolves_per_device(caps, precision, layout):
    ex = resolve("auto", caps)
    assert (ex.precision, ex.channels_last, ex.requested, ex.warning) == (precision, layout, "auto", None)
    assert ex.grad_scaler == (precision == "fp16")
    assert ex.describe().startswith(precision)


def test_reasons_say_why():
    assert "avx512_bf16" in resolve("auto", AVX512_BF16).reason
    assert "AVX2" in resolve("auto", AVX2).reason and "no native bf16" in resolve("auto", AVX2).reason
    assert "fp16 with the grad scaler" in resolve("auto", T4).reason


def test_explicit_choices_are_honoured_and_slow_ones_warned():
    forced = resolve("bf16", AVX2)
    assert forced.precision == "bf16" and forced.requested == "bf16"
    assert "10x slower" in forced.warning and "precision=auto" in forced.warning
    assert resolve("bf16", AVX512_BF16).warning is None
    assert resolve("fp32", AVX512_BF16).precision == "fp32"
    assert resolve("fp32", A100).channels_last is False  # NCHW is fine for fp32 on CUDA
    assert resolve("fp32", AVX2, channels_last=False).channels_last is False
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve("fp16", AVX2)
    with pytest.raises(ValueError, match="precision"):
        resolve("half", AVX2)


@pytest.mark.slow  # starts a separate Python process
def test_capabilities_of_this_machine_and_the_avx2_emulation():
    caps = capabilities("cpu")
    flags = open("/proc/cpuinfo").read()
    assert caps.native_bf16 == (("avx512_bf16" in flags or "amx_bf16" in flags) and caps.cpu_capability == "AVX512")
    # With torch's and oneDNN's ISA capped at AVX2, an AVX-512 machine must resolve like an AVX2-only one.
    code = ("from workers.hardware import capabilities, resolve_here; c = capabilities(); "
            "print(c.cpu_capability, c.native_bf16, resolve_here('auto').precision)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": "/usr/bin"},
                         cwd=__file__.rsplit("/tests/", 1)[0]).stdout.split()
    assert out == ["AVX2", "False", "fp32"]


# Ten rounds of: allocate 10 blocks of 2 MiB, touch them, free them all. With glibc's defaults the
# freed heap top (20 MiB) exceeds the trim threshold (raised only to 4 MiB by the first freed
# mmapped block), so each round gives the pages back and faults them in again; with gelato's
# thresholds they stay in the process.
_ROUNDS = """
import ctypes, json, resource, sys
sys.path.insert(0, {repo!r})
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if {tuned}:
    from workers.hardware import keep_freed_memory
    print(json.dumps(keep_freed_memory()))
faults = []
for _ in range(10):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(2 << 20) for _ in range(10)]
    for b in blocks:
        libc.memset(b, 1, 2 << 20)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps(faults))
"""


@pytest.mark.slow  # starts a separate Python process
@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc thresholds: Linux only")
def test_keep_freed_memory_stops_each_round_faulting_its_memory_in_again():
    import json
    import os

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def rounds(tuned: bool) -> list:
        out = subprocess.run([sys.executable, "-c", _ROUNDS.format(repo=repo, tuned=tuned)], capture_output=True,
                             text=True, check=True).stdout.split("\n")
        if tuned:
            assert json.loads(out[0]) == {"malloc": "glibc", "mmap_threshold": 32 << 20, "trim_threshold": 1 << 30,
                                        "arena_max": None}
        return json.loads(out[-2])

    pages = 10 * (2 << 20) // 4096  # 5,120 pages touched per round
    default, tuned = rounds(False), rounds(True)
    assert min(default[1:]) > pages // 2, default        # given back and faulted in again, every round
    assert max(tuned[1:]) < pages // 20, tuned           # reused

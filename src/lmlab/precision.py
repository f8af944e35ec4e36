"""One precision vocabulary for training, generation, evaluation and serving.

    p = resolve("auto", "cpu")      # Resolved(name="float32", dtype=float32, reason="...")
    with p.autocast():
        loss = objective(model, batch)

`auto` picks bf16 only where the device runs it natively and fast: a CUDA device that
supports bf16, or a CPU with AVX512-BF16 or AMX. Elsewhere (most laptops: AVX2 only) a bf16
matmul is emulated and runs two orders of magnitude slower than float32, so `auto` means
float32 there. The capability check is confirmed, once per process, by a tiny timed matmul:
a CPU flag a hypervisor reports but does not honour must not cost a user an hour.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.errors import LmlabError

# Every spelling users write, mapped to one canonical name.
ALIASES = {
    "auto": "auto",
    "float32": "float32", "fp32": "float32", "f32": "float32", "32": "float32", "full": "float32",
    "bf16": "bf16", "bfloat16": "bf16", "bf16-mixed": "bf16",
    "fp16": "fp16", "float16": "fp16", "f16": "fp16", "half": "fp16", "16": "fp16", "16-mixed": "fp16",
}
NAMES = ("auto", "float32", "bf16", "fp16")
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 must reach at least this share of float32's matmul speed to count as native.
NATIVE_SPEED_RATIO = 0.5


def parse(value: str) -> str:
    """The canonical name (auto, float32, bf16, fp16) of any accepted spelling."""
    key = str(value).strip().lower()
    if key not in ALIASES:
        raise LmlabError(f"unknown precision {value!r}; use one of {', '.join(NAMES)} "
                         "(aliases: fp32, bfloat16, float16, half)")
    return ALIASES[key]


@dataclass(frozen=True)
class Resolved:
    """What a precision setting means on one device, and why."""
    name: str  # float32 | bf16 | fp16 (never auto)
    device_type: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self):
        """Mixed precision for the forward pass: weights stay float32, matmuls run in
        the low-precision dtype; float32 is no context at all."""
        if self.name == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        return f"precision {self.name} on {self.device_type} ({self.reason})"


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it ("unknown" where it does not)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith(("model name", "Model name", "Hardware")):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine() or "unknown"


def machine_description() -> dict:
    """What a benchmark or an experiment ran on: its figures mean nothing without it."""
    import os

    flags = cpu_flags()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "bf16_instructions": cpu_has_bf16_instructions(),
            "avx2": "avx2" in flags, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cpu_has_bf16_instructions() -> bool:
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def _time_matmul(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: the first call may pick kernels
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=None)
def bf16_speed_ratio() -> float:
    """float32 time / bf16 time of a small matmul on this CPU (cached per process):
    about 1-3 where bf16 is native, about 0.01 where it is emulated."""
    return _time_matmul(torch.float32) / max(_time_matmul(torch.bfloat16), 1e-9)


def native_bf16(device_type: str) -> tuple[bool, str]:
    """Whether `device_type` runs bf16 natively and fast, with the evidence."""
    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, "the CUDA device supports bf16"
        return False, "the CUDA device has no bf16 support"
    if device_type == "cpu":
        if not cpu_has_bf16_instructions():
            return False, "the CPU has no AVX512-BF16 or AMX (bf16 would be emulated, far slower)"
        ratio = bf16_speed_ratio()
        if ratio < NATIVE_SPEED_RATIO:
            return False, f"the CPU reports bf16 instructions but a bf16 matmul ran {1 / ratio:.1f}x slower"
        return True, f"the CPU has AVX512-BF16/AMX (bf16 matmul {ratio:.1f}x float32's speed)"
    return False, f"no bf16 fast path is known for device {device_type!r}"


def resolve(value: str, device: str | torch.device = "cpu") -> Resolved:
    """What `value` (any accepted spelling) means on `device`; `auto` asks the hardware."""
    name = parse(value)
    device_type = torch.device(device).type
    if name == "auto":
        ok, why = native_bf16(device_type)
        return Resolved("bf16" if ok else "float32", device_type, f"auto: {why}")
    if name == "fp16" and device_type == "cpu":
        raise LmlabError("fp16 autocast is for GPUs; on a CPU use precision auto, bf16 or float32")
    return Resolved(name, device_type, "set explicitly")

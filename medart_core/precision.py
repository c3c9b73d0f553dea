"""Numeric precision as a setting: which dtype the frozen PixArt parts compute in, decided in one place.

Requested values (``TrainConfig.precision``, ``--precision`` of ``train``/``generate``/``evaluate``):

* ``"fp32"`` — everything in float32: bitwise equal to stock diffusers in float32, and what the exact-resume
  and pipeline-equality tests pin down.
* ``"bf16"`` — the frozen DiT, T5 and VAE weights are held in bfloat16 and their forward passes run under
  ``torch.autocast(device, bfloat16)``. LoRA weights, their gradients, the optimiser state, the losses and
  the DPM-Solver++ arithmetic stay float32 (``pixart.dit_eps`` hands the solver float32 ε).
* ``"auto"`` — bf16 where the device runs it fast, else fp32: CUDA when ``torch.cuda.is_bf16_supported()``;
  a CPU whose flags (Linux ``/proc/cpuinfo``) include ``avx512_bf16`` or ``amx_bf16`` — instructions that
  multiply bf16 natively (≈ 4x the fp32 matmul rate on a 1024² product on the project's 2-core machine).
  Without them torch emulates bf16 on the CPU, slower than fp32, so ``auto`` stays fp32 there (and
  everywhere the flags cannot be read, e.g. macOS or Windows).
* ``None`` — the device default, what every version before precision was a setting did: bf16 on a CUDA GPU
  that supports it (T5-XXL alone is 19 GB in fp32), fp32 on a CPU (bitwise reproducible against stock).

Why the CPU model name is not used: the same family name covers parts with and without AVX512-BF16, and
``torch.backends.cpu.get_cpu_capability()`` reports only the vector width ("AVX512"), not bf16 support.

torch is imported inside functions: the CLI imports this module at start-up.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

Precision = Literal["fp32", "bf16", "auto"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")
BF16_CPU_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
# What TrainConfig.mixed_precision (before precision was a setting) meant: "auto" and "bf16" both gave bf16 on a
# GPU and fp32 on a CPU (CPU bf16 was refused), i.e. the device default; "no" was fp32.
LEGACY_MIXED_PRECISION: dict[str, str | None] = {"no": "fp32", "auto": None, "bf16": None}


def validate_precision(value: Any, what: str = "precision") -> str | None:
    """``value`` if it is one of PRECISIONS or None; a ConfigError naming the choices otherwise."""
    if value is None or value in PRECISIONS:
        return value
    raise ConfigError(f"{what} must be one of {', '.join(PRECISIONS)} (or null for the device default: bf16 on "
                      f"a GPU, fp32 on a CPU); fp16 overflows in the pixel loss. Got {value!r}.")


@functools.lru_cache(maxsize=4)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor entry (Linux); empty where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_support(flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """(fast bf16 on this CPU?, why). ``flags`` defaults to :func:`cpu_flags` (inject them in tests)."""
    if flags is None:
        if not sys.platform.startswith("linux"):
            return False, f"CPU bf16 support is only detected on Linux (this is {sys.platform})"
        flags = cpu_flags()
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if have:
        return True, f"the CPU has {' and '.join(f.upper().replace('_', '-') for f in have)}"
    if not flags:
        return False, "the CPU flags could not be read"
    return False, "the CPU has neither AVX512-BF16 nor AMX-BF16 (bf16 would be emulated, slower than fp32)"


def _device_type(device: Any) -> str:
    return str(device or "cpu").split(":")[0]     # a torch.device prints as "cuda:0"


def cuda_bf16_support() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_precision(requested: str | None, device: Any, *, cpu_flags_override: frozenset[str] | None = None,
                      cuda_bf16: bool | None = None) -> tuple[str, str]:
    """The precision actually used (``"fp32"`` or ``"bf16"``) for ``requested`` on ``device``, and why.

    ``device`` is a torch device or its type string. ``cpu_flags_override`` and ``cuda_bf16`` replace the
    hardware probes (tests). An explicit ``"bf16"`` is honoured even where it is emulated (the reason says
    so): the user asked for it, e.g. to reproduce a GPU run's numbers on a CPU.
    """
    validate_precision(requested)
    kind = _device_type(device)
    if kind == "cuda":
        fast = cuda_bf16_support() if cuda_bf16 is None else bool(cuda_bf16)
        why_fast = "the GPU supports bf16" if fast else "the GPU does not support bf16 (torch.cuda.is_bf16_supported)"
    elif kind == "cpu":
        fast, why_fast = cpu_bf16_support(cpu_flags_override)
    else:
        fast, why_fast = False, f"bf16 speed on device type {kind!r} is not known"
    if requested == "fp32":
        return "fp32", "fp32 as asked"
    if requested == "bf16":
        return "bf16", "bf16 as asked" + ("" if fast else f" ({why_fast}: it may be slower than fp32)")
    if requested == "auto":
        return ("bf16", f"auto: {why_fast}") if fast else ("fp32", f"auto: {why_fast}")
    # None: the device default of every earlier version.
    if kind == "cuda" and fast:
        return "bf16", "default on a GPU (bf16 halves weight memory)"
    return "fp32", ("default on a CPU (fp32: bitwise equal to stock diffusers; --precision auto uses bf16 when "
                    "the CPU has it)" if kind == "cpu" else f"default: fp32 ({why_fast})")


def torch_dtype(precision: str) -> Any:
    """The torch dtype of a resolved precision."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def autocast(precision: str, device: Any) -> Any:
    """``torch.autocast(device_type, bfloat16)`` for ``"bf16"``, a no-op context for ``"fp32"``.

    Used around the frozen parts' forward passes (DiT, T5, VAE); ops autocast keeps in fp32 (losses,
    norms' statistics, softmax) and everything outside the context stay fp32.
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    import torch

    kind = _device_type(device)
    return torch.autocast(kind if kind in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16)


def from_mixed_precision(value: Any) -> str | None:
    """The precision an older config's ``mixed_precision`` ("no" / "auto" / "bf16") meant."""
    if value in LEGACY_MIXED_PRECISION:
        return LEGACY_MIXED_PRECISION[value]
    raise ConfigError(f"mixed_precision must be 'auto', 'bf16' or 'no' (fp16 overflows in the pixel loss); "
                      f"got {value!r}. Newer configs use precision: fp32, bf16 or auto.")


def of_dtype(dtype: Any) -> str:
    """The precision name of a torch dtype or its name ("float32" / "torch.bfloat16" ...), as records store it."""
    name = str(dtype).replace("torch.", "")
    return {"float32": "fp32", "bfloat16": "bf16"}.get(name, name)


__all__ = ["Precision", "PRECISIONS", "BF16_CPU_FLAGS", "validate_precision", "cpu_flags", "cpu_bf16_support",
           "cuda_bf16_support", "resolve_precision", "torch_dtype", "autocast", "from_mixed_precision", "of_dtype"]

"""Device and precision chosen at run time: CPU is first-class, CUDA optional, never hard-coded."""

from __future__ import annotations

import contextlib

import torch

from maisi.errors import InputError
from maisi.options import DeviceName, Precision

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: DeviceName) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; asking for CUDA without one is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested, but no CUDA device is available (use 'cpu' or 'auto')")
    return torch.device(name)


def autocast_dtype(
    precision: Precision, device: torch.device, cpu_bfloat16: bool = False
) -> torch.dtype | None:
    """The autocast dtype for the networks, or None for plain float32.

    ``auto`` is float16 on CUDA (what MAISI's released models run in) and float32 on CPU; with
    ``cpu_bfloat16`` (generation's UNet and ControlNet: faster per step, HU image 67 dB PSNR against float32,
    see docs/how-to/speed.md) it is bfloat16 on a CPU that computes it natively (AVX-512 BF16 or AMX; emulated
    bfloat16 is slower than float32).
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_bfloat16 and cpu_has_native_bfloat16() else None
    if precision == "float32":
        return None
    if device.type == "cpu" and precision == "float16":
        raise InputError("precision 'float16' is not supported on CPU; use 'float32', 'bfloat16' or 'auto'")
    return _DTYPES[precision]


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX tiles) that oneDNN uses."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu probes: guarded
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for ``dtype`` on ``device``; a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

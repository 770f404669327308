"""Run-time speed switches for the denoising networks: chosen per device, never stored in a checkpoint.

* ``compile``: ``torch.compile`` (inductor) of the diffusion UNet and the ControlNet. On CUDA in the
  ``reduce-overhead`` mode (CUDA graphs: the denoising loop calls the networks with the same shapes every
  step); on CPU in the default mode. ``"auto"`` compiles on CUDA only: on CPU the compilation costs minutes
  and saves less than that over a run (measured with ``tools/bench_generate.py``, see docs/how-to/speed.md).
* ``channels_last``: ``torch.channels_last_3d`` weights. Off by default: slower on CPU (measured); kept as a
  switch for the benchmarks (``tools/bench_gpu.sh`` measures it on CUDA).
* ``cache_condition``: the ControlNet's condition embedding depends only on the mask, so it is computed once
  per mask instead of at every step (:class:`ConditionCachingControlNet`); exact.

The autocast precision is resolved in :mod:`maisi.device`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from maisi.options import CompileOption

__all__ = ["Acceleration", "ConditionCachingControlNet", "accelerate", "compile_mode", "resolve_compile"]


def resolve_compile(setting: CompileOption, device: torch.device) -> bool:
    """Whether to compile the networks: ``"auto"`` is on for CUDA and off for CPU (see module docstring)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def compile_mode(device: torch.device) -> str:
    """CUDA graphs on CUDA (the loop's shapes are fixed, so launch overhead is what is left to remove)."""
    return "reduce-overhead" if device.type == "cuda" else "default"


@dataclass(frozen=True)
class Acceleration:
    """The speed switches applied to the UNet and ControlNet of one run."""

    compile: bool = False
    channels_last: bool = False
    cache_condition: bool = True
    compile_backend: str = "inductor"  # tests trace with a cheap backend; inductor takes minutes on CPU

    @classmethod
    def for_run(cls, compile_setting: CompileOption, device: torch.device) -> Acceleration:
        """The defaults for ``device``, with the config's ``compile`` setting resolved."""
        return cls(compile=resolve_compile(compile_setting, device))

    def describe(self, device: torch.device) -> dict[str, Any]:
        """What was applied, for logs and metadata."""
        return {
            "compile": compile_mode(device) if self.compile else False,
            "channels_last_3d": self.channels_last,
            "controlnet_condition_cached": self.cache_condition,
        }


class ConditionCachingControlNet(torch.nn.Module):
    """MONAI's ControlNet with its condition embedding computed once per mask.

    ``ControlNetMaisi.forward`` adds ``controlnet_cond_embedding(controlnet_cond)`` - a function of the mask
    alone - to the first feature map at every step. This wrapper runs that embedding itself, keeps the result
    while the same mask tensor (same object, not modified in place, same autocast state) comes back, and
    calls MONAI's own forward on a view of the network whose embedding is the identity, passing the cached
    embedding as ``controlnet_cond``. The network's parameters are shared, not copied; the wrapped network
    itself is left unchanged. Same call signature as the ControlNet.
    """

    def __init__(self, controlnet: torch.nn.Module) -> None:
        super().__init__()
        self.embedding = controlnet.controlnet_cond_embedding
        # A shallow copy with its own submodule table: everything shared except the embedding slot.
        body = object.__new__(type(controlnet))
        body.__dict__ = dict(controlnet.__dict__)
        body._modules = dict(controlnet._modules)
        body._modules["controlnet_cond_embedding"] = torch.nn.Identity()
        self.body = body
        self._key: tuple[Any, ...] | None = None
        # The mask the cache belongs to, weakly: the cache must not keep a full-resolution mask alive.
        self._cond: weakref.ref[torch.Tensor] | None = None
        self._value: torch.Tensor | None = None

    def embed(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        """The condition embedding of ``controlnet_cond``: (N, C0, x, y, z) at latent resolution."""
        device_type = controlnet_cond.device.type
        autocast = torch.is_autocast_enabled(device_type)
        key = (
            controlnet_cond._version,
            autocast,
            torch.get_autocast_dtype(device_type) if autocast else None,
            torch.is_grad_enabled(),
        )
        cached = self._cond() if self._cond is not None else None
        if cached is not controlnet_cond or self._key != key:
            self._value = None  # freed before the new one is computed
            self._value = self.embedding(controlnet_cond)
            self._cond, self._key = weakref.ref(controlnet_cond), key
        assert self._value is not None
        return self._value

    def clear(self) -> None:
        """Drop the cached embedding and the reference to its mask."""
        self._cond = self._value = self._key = None

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """MONAI's ``ControlNetMaisi.forward`` with the embedding of ``controlnet_cond`` (N, 8, 4x, 4y, 4z)
        taken from the cache; returns the down-block residuals and the mid-block residual."""
        return self.body(
            x=x,
            timesteps=timesteps,
            controlnet_cond=self.embed(controlnet_cond),
            conditioning_scale=conditioning_scale,
            context=context,
            class_labels=class_labels,
        )


def _compile(module: torch.nn.Module, device: torch.device, backend: str) -> torch.nn.Module:
    # dynamic=False: one job generates one grid, so one graph per network; a new grid recompiles.
    mode = compile_mode(device) if backend == "inductor" else None  # modes are inductor's
    return torch.compile(module, backend=backend, mode=mode, dynamic=False)  # type: ignore[return-value]


def accelerate(
    unet: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    device: torch.device,
    acceleration: Acceleration,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Apply the switches to the UNet and the ControlNet (already on ``device``, in eval mode).

    Returns:
        The modules to call in the denoising loop: the same call signatures as MONAI's networks.
    """
    if acceleration.channels_last:
        unet = unet.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        if controlnet is not None:
            controlnet = controlnet.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    if controlnet is not None and acceleration.cache_condition:
        controlnet = ConditionCachingControlNet(controlnet)
    if acceleration.compile:
        unet = _compile(unet, device, acceleration.compile_backend)
        if controlnet is not None:
            if isinstance(controlnet, ConditionCachingControlNet):
                # The per-step part only: the embedding runs once per mask, eagerly.
                controlnet.body = _compile(controlnet.body, device, acceleration.compile_backend)
            else:
                controlnet = _compile(controlnet, device, acceleration.compile_backend)
    return unet, controlnet

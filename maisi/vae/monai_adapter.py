"""The one place that knows the private structure of MONAI's ``AutoencoderKlMaisi``, for
:mod:`maisi.vae.tiled`.

The tiled engine streams a chain of convolutions; this adapter translates MONAI's encoder/decoder blocks into
that chain (:func:`program`) and holds the arithmetic that must match MONAI's forward bit for bit:
``MaisiGroupNorm3D``'s normalisation (:func:`normalise`), ``MaisiUpsample``'s interpolation (:func:`upsample`)
and ``MaisiDownsample``'s end padding (:attr:`Step.end_pad`). The parts outside the blocks (the latent 1x1
convolutions, the posterior's clamp) are never copied: :func:`run_decode` / :func:`run_encode` call MONAI's
own ``decode`` / ``encode`` with only the decoder / encoder replaced by the tiled one.

What it relies on (checked by :func:`check_structure` before any tiled run; parity with MONAI's forward is
tested for the installed MONAI in ``tests/test_tiled_vae.py``):

* the model is a MONAI ``AutoencoderKL`` whose ``encoder`` / ``decoder`` is exactly ``MaisiEncoder`` /
  ``MaisiDecoder``, a ``blocks`` ModuleList run in order;
* every block is exactly one of ``MaisiGroupNorm3D`` (followed by a ``MaisiConvolution``),
  ``MaisiConvolution``, ``MaisiResBlock`` (``norm1``, ``conv1``, ``norm2``, ``conv2``, ``nin_shortcut``),
  ``MaisiUpsample`` (trilinear then a convolution, or one transposed convolution: ``use_convtranspose``, as
  MAISI's mask VAE) or ``MaisiDownsample`` (pad ``(0, 1)`` per axis);
* a ``MaisiConvolution`` wraps a conv-only MONAI ``Convolution`` whose one child ``conv`` is an ``nn.Conv3d``
  (or, in a transposed ``MaisiUpsample``, an ``nn.ConvTranspose3d`` whose kernel reaches at least one stride)
  with cubic kernel, stride, padding and dilation, zero padding, one group.

Anything else (attention, ``AEKLResBlock``, a subclass) is reported by name, and
:mod:`maisi.vae.codec` falls back to MONAI's whole-volume pass with one warning.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL

from maisi.monai_internals import (
    MaisiConvolution,
    MaisiDecoder,
    MaisiDownsample,
    MaisiEncoder,
    MaisiGroupNorm3D,
    MaisiResBlock,
    MaisiUpsample,
)

Part = Literal["decoder", "encoder"]
_PART_TYPES: dict[str, type] = {"decoder": MaisiDecoder, "encoder": MaisiEncoder}


class UnsupportedStructure(ValueError):
    """The model is not built the way this adapter knows; the message names the module and its type."""


@dataclass(frozen=True)
class Step:
    """One streamed convolution, what precedes it, and its role in a ResBlock ("res_a": conv1 and the 1x1
    shortcut of the same input; "res_b": conv2, added to the residual)."""

    name: str
    conv: torch.nn.Conv3d | torch.nn.ConvTranspose3d
    norm: MaisiGroupNorm3D | None = None
    silu: bool = False
    upsample: bool = False
    end_pad: bool = False  # MaisiDownsample: one zero after each axis, then a convolution without padding
    role: Literal["plain", "res_a", "res_b"] = "plain"
    shortcut: torch.nn.Conv3d | None = None

    @property
    def transposed(self) -> bool:
        """A transposed convolution (MaisiUpsample with ``use_convtranspose``)."""
        return isinstance(self.conv, torch.nn.ConvTranspose3d)

    @property
    def pad(self) -> tuple[int, int]:
        return (0, 1) if self.end_pad else (self.conv.padding[0], self.conv.padding[0])  # type: ignore[return-value]

    def out_size(self, size: int) -> int:
        k, s, d = self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0]
        if self.transposed:
            return (size - 1) * s - 2 * self.pad[0] + d * (k - 1) + self.conv.output_padding[0] + 1
        return ((2 * size if self.upsample else size) + sum(self.pad) - d * (k - 1) - 1) // s + 1

    def conv_box(self, lo: int, hi: int) -> tuple[int, int]:
        """Convolution input [lo, hi) (on the upsampled grid if any) of the outputs [lo, hi)."""
        k, s, d = self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0]
        if self.transposed:
            # Input i reaches outputs i*s - p + [0, d(k-1)]. From the first input that reaches lo (or one
            # before it) to the last: the unpadded transposed output of these spans [a*s - p, (b-1)*s - p +
            # d(k-1)], which covers [lo, hi) because d(k-1) >= s - 1 (checked by the adapter).
            p = self.pad[0]
            return (lo + p - d * (k - 1)) // s, (hi - 1 + p) // s + 1
        return lo * s - self.pad[0], (hi - 1) * s - self.pad[0] + d * (k - 1) + 1

    def source_box(self, lo: int, hi: int, size: int) -> tuple[int, int]:
        """Stored input [lo, hi) read for the outputs [lo, hi), the input having ``size`` voxels."""
        a, b = self.conv_box(lo, hi)
        if not self.upsample:  # a transposed convolution reads its input box directly
            return a, b
        # Trilinear x2, align_corners False: output j reads inputs (j - 1) // 2 and the next one, clamped
        # to the volume; reading a region clipped to the volume reproduces that clamping exactly.
        a, b = max(a, 0), min(b, 2 * size)
        return max((a - 1) // 2, 0), min((b - 2) // 2 + 2, size)

    def read_dtype(self, stored: torch.dtype) -> torch.dtype:
        """Dtype a tile of the input is computed in: float32 under a GroupNorm (as MaisiGroupNorm3D), else
        the stored one (as MONAI's convolutions keep their input's dtype)."""
        return torch.float32 if self.norm is not None else stored


def _exact(module: Any, cls: type, path: str, children: tuple[str, ...] | None = None) -> None:
    """``module`` is exactly ``cls`` (a subclass may override forward() with arithmetic the tiles would not
    reproduce) with exactly the named submodules ``children`` (a new one would be one the tiles skip)."""
    if type(module) is not cls:
        raise UnsupportedStructure(f"{path} is {type(module).__name__}, expected MONAI's {cls.__name__}")
    if children is not None and (names := [n for n, _ in module.named_children()]) != list(children):
        raise UnsupportedStructure(
            f"{path} ({cls.__name__}) has submodules {names}, expected {list(children)}"
        )


def _conv3d(block: Any, path: str, transposed: bool = False) -> Any:
    """The ``nn.Conv3d`` (``transposed``: ``nn.ConvTranspose3d``) inside a ``MaisiConvolution`` (-> MONAI
    ``Convolution``, conv only -> ``conv``)."""
    _exact(block, MaisiConvolution, path, ("conv",))
    _exact(block.conv, Convolution, f"{path}.conv", ("conv",))  # conv only: no norm, activation, dropout
    conv = block.conv.conv
    _exact(conv, torch.nn.ConvTranspose3d if transposed else torch.nn.Conv3d, f"{path}.conv.conv", ())
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    if transposed:
        geometry += (conv.output_padding,)
    uniform = all(len(set(v)) == 1 for v in geometry)
    if not uniform or conv.padding_mode != "zeros" or conv.groups != 1:
        raise UnsupportedStructure(
            f"{path}.conv.conv is {conv}, expected cubic kernel/stride/padding/dilation, "
            "zero padding and one group"
        )
    if transposed and conv.dilation[0] * (conv.kernel_size[0] - 1) < conv.stride[0] - 1:
        raise UnsupportedStructure(f"{path}.conv.conv is {conv}, whose kernel leaves gaps between strides")
    return conv


def _res_steps(block: MaisiResBlock, name: str) -> list[Step]:
    _exact(block, MaisiResBlock, name, ("norm1", "conv1", "norm2", "conv2", "nin_shortcut"))
    for attr in ("norm1", "norm2"):
        _exact(getattr(block, attr), MaisiGroupNorm3D, f"{name}.{attr}", ())
    # MaisiResBlock.forward applies nin_shortcut exactly when the channel counts differ
    if block.in_channels != block.out_channels:
        shortcut = _conv3d(block.nin_shortcut, f"{name}.nin_shortcut")
    else:
        _exact(block.nin_shortcut, torch.nn.Identity, f"{name}.nin_shortcut", ())
        shortcut = None
    conv1, conv2 = _conv3d(block.conv1, f"{name}.conv1"), _conv3d(block.conv2, f"{name}.conv2")
    return [
        Step(f"{name}.conv1", conv1, block.norm1, True, role="res_a", shortcut=shortcut),
        Step(f"{name}.conv2", conv2, block.norm2, True, role="res_b"),
    ]


def _why_not(block: torch.nn.Module) -> str:
    """Why a block that is none of the known ones (as they are) cannot be tiled."""
    if "Attention" in type(block).__name__:
        return "attention needs the whole volume"
    known = (MaisiGroupNorm3D, MaisiConvolution, MaisiResBlock, MaisiUpsample, MaisiDownsample)
    base = next((cls for cls in known if isinstance(block, cls)), None)
    if base is not None and type(block) is not base:
        return f"a subclass of MONAI's {base.__name__}, whose forward may differ"
    if type(block) is MaisiDownsample:
        return f"padding {tuple(block.pad)}, expected (0, 1) per axis"
    return "not a block this adapter knows"


def program(autoencoder: torch.nn.Module, part: Part) -> list[Step]:
    """MONAI's ``autoencoder.<part>.blocks`` as streamed convolutions, in execution order.

    Raises:
        UnsupportedStructure: a module is not the one this adapter knows; the message names its path and type.
    """
    if not isinstance(autoencoder, AutoencoderKL):
        raise UnsupportedStructure(
            f"autoencoder is {type(autoencoder).__name__}, expected MONAI's AutoencoderKL"
        )
    module = getattr(autoencoder, part, None)
    _exact(module, _PART_TYPES[part], part, ("blocks",))
    blocks = module.blocks  # type: ignore[union-attr]
    _exact(blocks, torch.nn.ModuleList, f"{part}.blocks")
    steps: list[Step] = []
    norm: MaisiGroupNorm3D | None = None
    for i, block in enumerate(blocks):  # type: ignore[arg-type]
        name = f"{part}.blocks.{i}"
        if norm is not None and type(block) is not MaisiConvolution:
            raise UnsupportedStructure(
                f"{name} is {type(block).__name__} after a GroupNorm, expected a MaisiConvolution"
            )
        if type(block) is MaisiGroupNorm3D:
            _exact(block, MaisiGroupNorm3D, name, ())
            norm = block
        elif type(block) is MaisiConvolution:
            steps.append(Step(name, _conv3d(block, name), norm=norm))
            norm = None
        elif type(block) is MaisiResBlock:
            steps.extend(_res_steps(block, name))
        elif type(block) is MaisiUpsample:
            _exact(block, MaisiUpsample, name, ("conv",))
            transposed = bool(block.use_convtranspose)
            conv = _conv3d(block.conv, f"{name}.conv", transposed)
            steps.append(Step(name, conv, upsample=not transposed))
        elif type(block) is MaisiDownsample and tuple(block.pad) == (0, 1) * 3:
            _exact(block, MaisiDownsample, name, ("conv",))
            steps.append(Step(name, _conv3d(block.conv, f"{name}.conv"), end_pad=True))
        else:
            raise UnsupportedStructure(f"cannot tile {name} ({type(block).__name__}): {_why_not(block)}")
    if norm is not None:
        raise UnsupportedStructure(
            f"{part}.blocks ends with a GroupNorm, expected a MaisiConvolution after it"
        )
    _check_all_used(module, steps, part)  # type: ignore[arg-type]
    return steps


def _check_all_used(module: torch.nn.Module, steps: list[Step], part: str) -> None:
    """Every parameter and buffer of ``module`` is one the steps apply; anything else changes the result."""
    used = {
        id(t) for s in steps for m in (s.conv, s.shortcut, s.norm) if m is not None for t in m.parameters()
    }
    unused = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if id(t) not in used]
    if unused:
        raise UnsupportedStructure(f"{part}.{unused[0]} is not used by the tiled path ({len(unused)} unused)")


def check_structure(autoencoder: torch.nn.Module, part: Part) -> str | None:
    """Why the tiled path cannot run ``part`` of this model (the module path and type), or None if it can.

    Inspects the model once, with the same code the tiled run uses, so a model that passes cannot fail the
    tiled run for its structure.
    """
    try:
        program(autoencoder, part)
    except UnsupportedStructure as err:
        return str(err)
    except AttributeError as err:  # an attribute this adapter reads is gone (another MONAI version)
        return f"{part}: {err}"
    return None


def norm_params(
    step: Step, mean: torch.Tensor, var: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float32 mean and ``sqrt(var + eps)`` from per-(sample, group) whole-volume statistics,
    each (N, C, 1, 1, 1), in MaisiGroupNorm3D's arithmetic (float32 variance, then ``add_(eps).sqrt_()``)."""
    norm = step.norm
    assert norm is not None
    reps, view = norm.num_channels // norm.num_groups, (mean.shape[0], norm.num_channels, 1, 1, 1)
    std = var.float().add_(norm.eps).sqrt_()
    return (
        mean.float().repeat_interleave(reps, dim=1).view(view).to(device),
        std.repeat_interleave(reps, dim=1).view(view).to(device),
    )


def normalise(
    buf: torch.Tensor, inside: list[slice], step: Step, params: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """GroupNorm (+ SiLU) of the in-volume part ``inside`` of ``buf``, in place, in MaisiGroupNorm3D's
    arithmetic: float32 ``(x - mean) / std``, the optional float16 cast, then the affine parameters. The zero
    fill outside the volume stays zero: it is the convolution's padding.

    Returns:
        ``buf`` (a float16 copy when the norm casts to float16).
    """
    norm = step.norm
    assert norm is not None
    region = (slice(None), slice(None), *inside)
    x = buf[region]
    x.sub_(params[0]).div_(params[1])
    if norm.norm_float16:
        buf = buf.to(torch.float16)
        x = buf[region]
    if norm.affine:
        x.mul_(norm.weight.view(1, -1, 1, 1, 1)).add_(norm.bias.view(1, -1, 1, 1, 1))
    if step.silu:
        F.silu(x, inplace=True)
    return buf


def upsample(x: torch.Tensor) -> torch.Tensor:
    """The interpolation ``MaisiUpsample.forward`` makes before its convolution (see
    :meth:`Step.source_box`)."""
    return F.interpolate(x, scale_factor=2.0, mode="trilinear")


def conv_transposed(
    step: Step, x: torch.Tensor, lo: tuple[int, ...], hi: tuple[int, ...], box: list[tuple[int, int]]
) -> torch.Tensor:
    """Outputs [lo, hi) of a transposed convolution from its input region ``box`` (per axis [a, b), from
    :meth:`Step.source_box`, zero outside the volume).

    The module's own weights, as s^3 plain convolutions, one per output phase (dilation 1): the unpadded
    output ``s*m + r`` sums the taps ``r + s*j`` of the inputs ``m - j``, a correlation with the flipped
    taps. The input at region start a reaches output ``a*s - p`` first, so a tile computes only the ``m`` of
    its own outputs (inputs beyond the region are zero: they reach none of them; outputs no input reaches,
    MONAI's output padding, get the bias only). The same products and sums as MONAI's ``conv_transpose3d``
    up to summation order, several times faster on CPU (oneDNN's direct convolutions, nothing to crop).
    Another dilation takes ``conv_transpose3d`` and a crop.

    Args:
        step: a transposed step.
        x: (N, C_in, bx, by, bz) input region.
        lo, hi: the output tile per axis.
        box: the input region per axis.

    Returns:
        (N, C_out, hi - lo per axis).
    """
    t = step.conv
    s, p = t.stride[0], step.pad[0]
    if t.dilation[0] != 1:
        y = F.conv_transpose3d(x, t.weight, t.bias, t.stride, 0, 0, t.groups, t.dilation)
        region = tuple(slice(b - (a * s - p), e - (a * s - p)) for b, e, (a, _) in zip(lo, hi, box))
        return y[(slice(None), slice(None), *region)]
    weight = t.weight.transpose(0, 1)  # (C_out, C_in, k, k, k), as conv3d has it
    tile = [(b - a * s + p, e - a * s + p) for b, e, (a, _) in zip(lo, hi, box)]  # unpadded coordinates
    out = None
    for r in itertools.product(range(s), repeat=3):
        # this phase's outputs in the tile: m in [m0, m1) per axis, reading inputs m0 - (taps - 1) .. m1 - 1
        spans = [(-((q - u0) // s), -((q - u1) // s)) for q, (u0, u1) in zip(r, tile)]
        if any(m1 <= m0 for m0, m1 in spans):
            continue
        taps = weight[:, :, r[0] :: s, r[1] :: s, r[2] :: s].flip(2, 3, 4)
        pad = []  # F.pad: last axis first; negative = crop
        for (m0, m1), n, size in reversed(list(zip(spans, taps.shape[2:], x.shape[2:]))):
            pad += [n - 1 - m0, m1 - size]
        y = F.conv3d(F.pad(x, pad), taps, t.bias)
        if out is None:  # in the convolution's dtype (autocast)
            out = y.new_empty(*y.shape[:2], *(e - b for b, e in zip(lo, hi)))
        dst = (slice(s * m0 + q - u0, None, s) for q, (m0, _), (u0, _) in zip(r, spans, tile))
        out[(slice(None), slice(None), *dst)] = y
    assert out is not None  # every axis has outputs of some phase
    return out


def conv(conv3d: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """The module's own weights with padding 0: the tile's halo (or zero fill at the border) is the padding.

    Plain ``F.conv3d``: calling ``torch.mkldnn_convolution`` directly (PyTorch sends inputs with
    N*C*X*Y <= 20480 to a slower kernel) saved nothing at the default 1 GiB budget on the released VAE
    (22-24 CPU s either way, 2 cores) and 13-14% only for budgets small enough to make tiles that thin.
    """
    return F.conv3d(x, conv3d.weight, conv3d.bias, conv3d.stride, 0, conv3d.dilation, conv3d.groups)


class _PartReplaced:
    """The autoencoder as MONAI's ``decode``/``encode`` sees it, with one attribute (the decoder or the
    encoder) replaced by a function; every other attribute is the model's own."""

    def __init__(self, autoencoder: torch.nn.Module, part: Part, fn: Callable[[torch.Tensor], torch.Tensor]):
        self._autoencoder = autoencoder
        setattr(self, part, fn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._autoencoder, name)


def run_decode(
    autoencoder: torch.nn.Module, z: torch.Tensor, decoder: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """MONAI's own ``decode(z)`` (the latent 1x1 convolution, then the decoder) with ``decoder`` in place of
    ``autoencoder.decoder``."""
    return type(autoencoder).decode(_PartReplaced(autoencoder, "decoder", decoder), z)  # type: ignore[arg-type]


def run_encode(
    autoencoder: torch.nn.Module, x: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's own ``encode(x)`` (the encoder, then the posterior's 1x1 convolutions and clamp) with
    ``encoder`` in place of ``autoencoder.encoder``; returns ``(z_mu, z_sigma)``."""
    return type(autoencoder).encode(_PartReplaced(autoencoder, "encoder", encoder), x)  # type: ignore[arg-type]

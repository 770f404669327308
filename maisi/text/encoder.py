"""Text encoders: prompts -> (N, 77, D) context for a cross-attention UNet.

Two implementations of :class:`TextEncoder`:

- :class:`TinyClipTextEncoder`, a small CLIP-style transformer (token and position embeddings, causal
  pre-norm blocks of MONAI's ``TransformerBlock``, final layer norm) for the demo models: trained with the
  UNet, stored in its checkpoint as :meth:`~TinyClipTextEncoder.record` (plain tensors and numbers, loadable
  with ``weights_only=True``) and rebuilt strictly by :meth:`~TinyClipTextEncoder.from_record`.
- :class:`PretrainedClipTextEncoder`, a ``transformers`` ``CLIPTextModel`` such as Stable Diffusion 2.1's
  (23 layers, width 1024, 16 heads, GELU; :data:`SD21_TEXT_ENCODER`), loaded by :func:`load_clip_text_encoder`
  from a local folder only: SD-2.1 left the Hugging Face Hub in November 2025, so hub ids are refused.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from monai.networks.blocks import TransformerBlock

from maisi.errors import InputError
from maisi.files import file_sha256
from maisi.text.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, ClipTokenizer, NullPrompt, require_transformers

# Stable Diffusion 2.1's text encoder (text_encoder/config.json of stabilityai/stable-diffusion-2-1[-base]):
# OpenCLIP ViT-H/14's text tower without its last layer.
SD21_TEXT_ENCODER: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=CONTEXT_LENGTH,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@runtime_checkable
class TextEncoder(Protocol):
    """Turns prompts into the context a cross-attention UNet takes."""

    width: int  # D, the UNet's cross_attention_dim

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(N, 77, D) float context of ``prompts`` (N)."""
        ...

    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, 77, D) float context of (N, 77) token ids (e.g. the null prompt's)."""
        ...


class _TokenizingEncoder(ABC):
    """Shared ``encode``: tokenize with a :class:`ClipTokenizer` (built on first use), then encode the ids."""

    tokenizer: ClipTokenizer | None = None

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            self.tokenizer = ClipTokenizer()
        return self.encode_tokens(self.tokenizer(prompts).ids)

    def null_context(self, mode: NullPrompt = "training") -> torch.Tensor:
        """(1, 77, D) embedding of the null prompt (see :meth:`ClipTokenizer.null_tokens`)."""
        if self.tokenizer is None:
            self.tokenizer = ClipTokenizer()
        return self.encode_tokens(self.tokenizer.null_tokens(mode)[None])

    @abstractmethod
    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, 77, D) float context of (N, 77) token ids."""


class TinyClipTextEncoder(_TokenizingEncoder, torch.nn.Module):
    """A small CLIP-style text transformer for demo models, trained with the UNet.

    Args:
        width: D, the embedding width (the UNet's ``cross_attention_dim``).
        layers: number of transformer blocks.
        heads: attention heads per block (``width`` must divide by it).
        mlp_ratio: MLP hidden width / ``width``.
        tokenizer: the tokenizer ``encode`` uses; None builds the default one on first use.
    """

    def __init__(
        self,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        tokenizer: ClipTokenizer | None = None,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.width, self.layers, self.heads, self.mlp_ratio = width, layers, heads, mlp_ratio
        self.tokenizer = tokenizer
        self.token_embedding = torch.nn.Embedding(VOCAB_SIZE, width)
        self.position_embedding = torch.nn.Parameter(torch.randn(CONTEXT_LENGTH, width) * 0.01)
        torch.nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(
                width,
                mlp_ratio * width,
                heads,
                qkv_bias=True,
                causal=True,  # CLIP's text tower: each token attends to those before it
                sequence_length=CONTEXT_LENGTH,
            )
            for _ in range(layers)
        )
        self.final_norm = torch.nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, 77) int64 token ids -> (N, 77, width) context."""
        if ids.ndim != 2 or ids.shape[1] != CONTEXT_LENGTH:
            raise ValueError(f"token ids must be (N, {CONTEXT_LENGTH}), got shape {tuple(ids.shape)}")
        x = self.token_embedding(ids) + self.position_embedding
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        device = self.position_embedding.device
        return self(ids.to(device))

    def architecture(self) -> dict[str, int]:
        """The constructor arguments that shape the weights."""
        return {"width": self.width, "layers": self.layers, "heads": self.heads, "mlp_ratio": self.mlp_ratio}

    def record(self, null_tokens: torch.Tensor) -> dict[str, Any]:
        """What a UNet checkpoint stores of this encoder: architecture, weights (CPU tensors) and the
        (77,) null-prompt token ids the UNet was trained with; loadable with ``weights_only=True``."""
        return {
            "architecture": self.architecture(),
            "weights": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "null_tokens": null_tokens.detach().cpu().to(torch.int64).clone(),
        }

    @classmethod
    def from_record(
        cls, record: dict[str, Any], tokenizer: ClipTokenizer | None = None
    ) -> tuple[TinyClipTextEncoder, torch.Tensor]:
        """(encoder in eval mode, (77,) null tokens) from :meth:`record`; the weights load strictly.

        Raises:
            InputError: the record lacks a key, or its weights do not fit its architecture (names the keys).
        """
        missing = [k for k in ("architecture", "weights", "null_tokens") if k not in record]
        if missing:
            raise InputError(f"text encoder record lacks {missing}")
        encoder = cls(**record["architecture"], tokenizer=tokenizer)
        result = encoder.load_state_dict(record["weights"], strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise InputError(
                f"text encoder weights do not fit {record['architecture']}: "
                f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        null_tokens = torch.as_tensor(record["null_tokens"], dtype=torch.int64)
        if null_tokens.shape != (CONTEXT_LENGTH,):
            raise InputError(f"text encoder record: null_tokens must be ({CONTEXT_LENGTH},) token ids")
        return encoder.eval(), null_tokens


class PretrainedClipTextEncoder(_TokenizingEncoder):
    """A ``transformers`` ``CLIPTextModel`` behind :class:`TextEncoder`: its last hidden state (after the
    final layer norm) is the context, as Stable Diffusion 2.x and the CXR LDM use it.

    Attributes:
        model: the ``CLIPTextModel`` (eval mode).
        width: its hidden size D.
        sha256: SHA-256 of every file of the folder it was loaded from, by relative path (for the metadata).
    """

    def __init__(self, model: Any, sha256: dict[str, str], tokenizer: ClipTokenizer | None = None):
        self.model, self.sha256, self.tokenizer = model.eval(), sha256, tokenizer
        self.width = int(model.config.hidden_size)

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(device)).last_hidden_state.float()


def load_clip_text_encoder(
    path: str | Path, expected_width: int | None = SD21_TEXT_ENCODER["hidden_size"], tokenizer=None
) -> PretrainedClipTextEncoder:
    """Load a ``CLIPTextModel`` from a local folder (``config.json`` + weights, as ``save_pretrained`` writes
    them, e.g. SD-2.1's ``text_encoder/``; a pipeline folder holding ``text_encoder/`` works too).

    Args:
        path: the folder. Hub ids are refused: SD-2.1 left the Hugging Face Hub, so its encoder can only come
            from a copy the user has, and nothing is downloaded.
        expected_width: the hidden size the UNet's cross-attention takes (1024 for SD-2.1); None skips.
        tokenizer: the tokenizer ``encode`` uses; None builds the default one on first use.

    Raises:
        InputError: not a local folder (a hub id named as such), no ``config.json``, a config of another
            width (named with the one expected), ``transformers`` missing, or weights that do not load
            strictly (a missing, unexpected or mismatched key, named).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if _HUB_ID.match(str(path)) and not folder.exists():
            raise InputError(
                f"text encoder {path!r} looks like a Hugging Face Hub id: only local folders are loaded "
                "(local_files_only): stabilityai/stable-diffusion-2-1 left the Hub in November 2025, so "
                "point text_encoder.path at the text_encoder/ folder of a copy you have"
            )
        raise InputError(f"text encoder {path}: no such folder")
    if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
        folder = folder / "text_encoder"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"text encoder {folder}: no config.json (expected a CLIPTextModel folder)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"text encoder {config_path}: unreadable JSON ({e})") from None
    width = config.get("hidden_size") if isinstance(config, dict) else None
    if expected_width is not None and width != expected_width:
        raise InputError(
            f"text encoder {folder}: hidden_size {width}, expected {expected_width} (the width the UNet's "
            "cross-attention takes)"
        )
    transformers = require_transformers()
    try:
        model, info = transformers.CLIPTextModel.from_pretrained(
            folder, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError) as e:
        raise InputError(f"text encoder {folder}: {e}") from None
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):  # from_pretrained is lenient: missing weights would keep random values
        shown = "; ".join(f"{k.replace('_', ' ')}: {v[:5]}" for k, v in problems.items() if v)
        raise InputError(f"text encoder {folder}: the weights do not fit its config ({shown})")
    sha256 = {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    return PretrainedClipTextEncoder(model, sha256, tokenizer)

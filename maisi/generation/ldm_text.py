"""The prompts of a text LDM run: tokenized once, encoded once per prompt, and the null prompt's embedding
for classifier-free guidance (:class:`maisi.sampling.ContextGuidance`).

The text encoder is ``$.text_encoder.path`` (a local ``transformers`` ``CLIPTextModel`` folder such as
SD-2.1's, :func:`maisi.text.encoder.load_clip_text_encoder`) or ``$.text_encoder.checkpoint`` (a
:meth:`~maisi.text.encoder.TinyClipTextEncoder.record` saved with ``torch.save``, loaded ``weights_only``).
Its width must be the preset's context width. ``$.sampling.null_prompt`` ``training`` takes the record's
stored null tokens when it has them, else start + 76 x end; ``empty_string`` the encoded "".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maisi.config import InferConfig
from maisi.errors import InputError
from maisi.families.ldm import LDMPreset
from maisi.files import file_sha256
from maisi.options import NullPrompt
from maisi.text.encoder import TinyClipTextEncoder, load_clip_text_encoder
from maisi.text.tokenizer import CONTEXT_LENGTH, ClipTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptContext:
    """What the UNet cross-attends to, for every prompt of a run.

    Attributes:
        prompts: the prompts, in the config's order.
        ids: (P, 77) int64 token ids.
        cut: per prompt, the tokens cut to fit 77.
        contexts: (P, 77, D) float32 embeddings on the compute device.
        null_prompt: the null-prompt mode.
        null_tokens: (77,) token ids of the null prompt.
        null_context: (1, 77, D) its embedding.
        source: the text encoder: ``kind`` (``path`` or ``checkpoint``), ``file`` and ``sha256`` (by file).
    """

    prompts: tuple[str, ...]
    ids: torch.Tensor
    cut: tuple[int, ...]
    contexts: torch.Tensor
    null_prompt: NullPrompt
    null_tokens: torch.Tensor
    null_context: torch.Tensor
    source: dict[str, Any]

    def metadata(self, index: int, guidance_scale: float) -> dict[str, Any]:
        """The text part of the metadata of prompt ``index``'s samples."""
        return {
            "prompt_index": index,
            "prompt": self.prompts[index],
            "token_ids": self.ids[index].tolist(),
            "tokens_cut": self.cut[index],
            "guidance_scale": guidance_scale,
            "null_prompt": self.null_prompt,
            "null_token_ids": self.null_tokens.tolist(),
            "text_encoder": self.source,
        }


def _load_record(path: Path, width: int | None) -> dict[str, Any]:
    """A text encoder record, loaded ``weights_only``, whose width is ``width``."""
    key = "$.text_encoder.checkpoint"
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{key}: {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        raise InputError(f"{key}: {path}: not a text encoder record ({type(e).__name__}: {e})") from None
    architecture = record.get("architecture") if isinstance(record, dict) else None
    if not isinstance(architecture, dict):
        raise InputError(f"{key}: {path}: not a text encoder record (TinyClipTextEncoder.record)")
    if width is not None and architecture.get("width") != width:
        raise InputError(
            f"{key}: {path}: width {architecture.get('width')}, expected {width} (the width the UNet's "
            "cross-attention takes)"
        )
    return record


def load_prompt_context(config: InferConfig, preset: LDMPreset, device: torch.device) -> PromptContext:
    """Tokenize and encode ``$.prompts`` and the null prompt with ``$.text_encoder`` (under no_grad).

    Raises:
        InputError: the vocabulary or ``transformers`` is missing, or the text encoder is missing, not
            loadable or of another width than the preset's (named with the width expected).
    """
    assert config.prompts and config.text_encoder is not None  # checked by ldm_infer_problems
    try:
        tokenizer = ClipTokenizer()
    except InputError as e:
        raise InputError(f"$.prompts: {e}") from None
    width = preset.context_width
    source: dict[str, Any]
    if config.text_encoder.path is not None:
        try:
            encoder: Any = load_clip_text_encoder(config.text_encoder.path, width, tokenizer)
        except InputError as e:
            raise InputError(f"$.text_encoder.path: {e}") from None
        encoder.model.to(device)
        source, stored = (
            {"kind": "path", "file": str(config.text_encoder.path), "sha256": encoder.sha256},
            None,
        )
    else:
        path = Path(str(config.text_encoder.checkpoint))
        record = _load_record(path, width)
        try:
            encoder, stored = TinyClipTextEncoder.from_record(record, tokenizer)
        except (InputError, TypeError) as e:
            raise InputError(f"$.text_encoder.checkpoint: {path}: {e}") from None
        encoder.to(device)
        source = {"kind": "checkpoint", "file": str(path), "sha256": {path.name: file_sha256(path)}}
    mode = config.sampling.null_prompt
    null = stored if mode == "training" and stored is not None else tokenizer.null_tokens(mode)
    tokens = tokenizer(list(config.prompts))
    for i, cut in enumerate(tokens.cut):
        if cut:
            log.warning(
                "$.prompts[%d]: %d token(s) cut: a prompt holds at most %d tokens with the start and end "
                "tokens (%r)",
                i,
                cut,
                CONTEXT_LENGTH,
                config.prompts[i][:60],
            )
    with torch.no_grad():
        contexts = encoder.encode_tokens(tokens.ids).float()
        null_context = encoder.encode_tokens(null[None]).float()
    return PromptContext(
        tuple(config.prompts), tokens.ids, tokens.cut, contexts, mode, null, null_context, source
    )

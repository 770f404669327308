"""The CLIP tokenizer of Stable Diffusion 2.1, from a library: ``transformers``' ``CLIPTokenizer`` built from
the CLIP BPE vocabulary that ``open_clip_torch``'s wheel ships (``open_clip/bpe_simple_vocab_16e6.txt.gz``).

SD-2.1's tokenizer lower-cases, cuts every prompt to 77 tokens with the start token 49406 first and the end
token 49407 last, and pads with 0 (the token "!", SD-2.1's ``pad_token``). The vocabulary file is found by
:func:`find_clip_vocabulary` (an explicit path, the maisi cache, or an installed ``open_clip`` package, read
without importing it) and checked by SHA-256; :func:`fetch_clip_vocabulary` puts it in the cache from the
pinned PyPI wheel. ``transformers`` is the optional extra ``text`` (``pip install -e '.[text]'``), imported
only when a tokenizer is built.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maisi.errors import InputError
from maisi.files import ChecksumMismatch, check_file, install_verified
from maisi.options import NullPrompt

CONTEXT_LENGTH = 77
START_TOKEN = 49406  # <|startoftext|>
END_TOKEN = 49407  # <|endoftext|>
PAD_TOKEN = 0  # "!": SD-2.1's tokenizer pads with it (its pad_token), open_clip with 0 too
VOCAB_SIZE = 49408
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_BYTES = 1_356_917
WHEEL_REQUIREMENT = "open_clip_torch==3.3.0"
WHEEL_FILE = "open_clip_torch-3.3.0-py3-none-any.whl"
WHEEL_SHA256 = "c549ad5ed6bfc119cc11105033c0a2b9d7a2a4afeb40a58a09aab3da1a0043ce"
INSTALL_HINT = "pip install -e '.[text]'"


def default_cache() -> Path:
    """Where :func:`fetch_clip_vocabulary` puts the vocabulary: ``$XDG_CACHE_HOME/maisi/text`` (default
    ``~/.cache/maisi/text``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "maisi" / "text"


def _installed_open_clip_vocabulary() -> Path | None:
    """The vocabulary inside an installed ``open_clip`` package, found without importing it (its
    ``__init__`` imports torchvision)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / VOCAB_FILE).is_file():
            return Path(folder) / VOCAB_FILE
    return None


def find_clip_vocabulary(path: str | Path | None = None) -> Path:
    """The checked CLIP BPE vocabulary file: ``path`` when given, else the cache, else ``open_clip``'s.

    Raises:
        InputError: no file found, or the file is not the pinned one (size or SHA-256).
    """
    if path is not None:
        candidates = [Path(path).expanduser()]
        if not candidates[0].is_file():
            raise InputError(f"CLIP vocabulary {path}: no such file (expected {VOCAB_FILE})")
    else:
        installed = _installed_open_clip_vocabulary()
        candidates = [default_cache() / VOCAB_FILE, *([installed] if installed else [])]
    for candidate in candidates:
        if candidate.is_file():
            try:
                check_file(candidate, VOCAB_SHA256, VOCAB_BYTES)
            except ChecksumMismatch as e:
                raise InputError(f"CLIP vocabulary {candidate}: {e}") from None
            return candidate
    raise InputError(
        f"the CLIP BPE vocabulary {VOCAB_FILE} was not found in {default_cache()} nor in an installed "
        "open_clip package; fetch it once from PyPI with "
        "python -c 'from maisi.text.tokenizer import fetch_clip_vocabulary; fetch_clip_vocabulary()'"
    )


def fetch_clip_vocabulary(dest: str | Path | None = None) -> Path:
    """Download the pinned ``open_clip_torch`` wheel with ``pip download --no-deps`` and put its vocabulary
    at ``dest/bpe_simple_vocab_16e6.txt.gz`` (default: :func:`default_cache`), both checked by SHA-256.
    Nothing is installed; an up-to-date file is kept.

    Raises:
        RuntimeError: pip could not download the wheel (its output is in the message).
        ChecksumMismatch: the wheel or the file in it is not the pinned one.
    """
    target = Path(dest).expanduser() if dest is not None else default_cache()
    target = target / VOCAB_FILE
    if target.is_file():
        try:
            check_file(target, VOCAB_SHA256, VOCAB_BYTES)
            return target
        except ChecksumMismatch:
            pass  # replaced below
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp]
        result = subprocess.run([*cmd, WHEEL_REQUIREMENT], capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL_FILE
        if result.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed:\n{result.stdout}{result.stderr}")
        check_file(wheel, WHEEL_SHA256)
        with zipfile.ZipFile(wheel) as archive:
            extracted = Path(archive.extract(f"open_clip/{VOCAB_FILE}", tmp))
        install_verified(extracted, target, VOCAB_SHA256, VOCAB_BYTES)
    return target


def _bpe_tables(vocabulary: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges from the BPE file, in CLIP's order: 256 byte characters, the same with
    the end-of-word mark ``</w>``, one entry per merge (the file's first 48,894), then start and end."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(vocabulary.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : VOCAB_SIZE - 2 * 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def require_transformers() -> Any:
    """The ``transformers`` module, or an InputError naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise InputError(f"text prompts need the optional 'transformers' package: {INSTALL_HINT}") from None
    return transformers


@dataclass(frozen=True)
class Tokens:
    """Token ids of a batch of prompts.

    Attributes:
        ids: (N, 77) int64 token ids: start, the prompt's tokens, end, then 0s.
        cut: per prompt, how many of its tokens were cut to fit 77 (0 when it fits), for the caller to warn.
    """

    ids: torch.Tensor
    cut: tuple[int, ...]


class ClipTokenizer:
    """SD-2.1's CLIP tokenizer (``transformers.CLIPTokenizer`` on the pinned CLIP BPE vocabulary).

    Args:
        vocabulary: the ``bpe_simple_vocab_16e6.txt.gz`` file; None: :func:`find_clip_vocabulary`.

    Raises:
        InputError: ``transformers`` is missing, or the vocabulary is missing or not the pinned file.
    """

    def __init__(self, vocabulary: str | Path | None = None):
        transformers = require_transformers()
        self.vocabulary = find_clip_vocabulary(vocabulary)
        vocab, merges = _bpe_tables(self.vocabulary)
        self._tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!")
        if self._tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "!"]) != [
            START_TOKEN,
            END_TOKEN,
            PAD_TOKEN,
        ]:
            raise RuntimeError("the CLIP tokenizer's start, end or padding ids are not CLIP's")

    def __call__(self, prompts: Sequence[str]) -> Tokens:
        """Token ids (N, 77) of ``prompts`` (lower-cased; long prompts cut, keeping the end token last)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a list of strings, got {prompts!r}")
        full = self._tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        encoded = self._tokenizer(
            list(prompts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True
        )["input_ids"]
        cut = tuple(max(0, len(ids) - (CONTEXT_LENGTH - 2)) for ids in full)
        return Tokens(torch.tensor(encoded, dtype=torch.int64).view(-1, CONTEXT_LENGTH), cut)

    def null_tokens(self, mode: NullPrompt = "training") -> torch.Tensor:
        """(77,) ids of the null prompt: ``training`` = start + 76 x end (what the seed's training dropped
        prompts to), ``empty_string`` = the encoded "" (start, end, 75 x 0: what the seed sampled with)."""
        if mode == "training":
            return torch.tensor([START_TOKEN] + [END_TOKEN] * (CONTEXT_LENGTH - 1), dtype=torch.int64)
        if mode == "empty_string":
            return self([""]).ids[0]
        raise InputError(f"null_prompt must be 'training' or 'empty_string', got {mode!r}")

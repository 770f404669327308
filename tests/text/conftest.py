"""The CLIP vocabulary for the text tests: from the cache, an installed open_clip, or fetched once from PyPI
into the repository's .cache (skipped when transformers is absent or PyPI cannot be reached)."""

from __future__ import annotations

from pathlib import Path

import pytest

from maisi.errors import InputError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def clip_vocabulary() -> Path:
    pytest.importorskip("transformers", reason="the optional extra 'text' is not installed")
    from maisi.text.tokenizer import fetch_clip_vocabulary, find_clip_vocabulary

    try:
        return find_clip_vocabulary()
    except InputError:
        pass
    try:
        return fetch_clip_vocabulary(REPO / ".cache" / "text")
    except RuntimeError as e:  # offline
        pytest.skip(f"CLIP vocabulary not cached and not downloadable: {str(e).splitlines()[0]}")


@pytest.fixture(scope="session")
def clip_tokenizer(clip_vocabulary):
    from maisi.text.tokenizer import ClipTokenizer

    return ClipTokenizer(clip_vocabulary)

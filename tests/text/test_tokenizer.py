"""SD-2.1's CLIP tokenizer from transformers on the pinned open_clip vocabulary: pinned ids, truncation at
77 keeping the end token, padding with 0, the two null prompts, and the refusals."""

from __future__ import annotations

import builtins
import gzip

import pytest
import torch

from maisi.errors import InputError
from maisi.text import tokenizer as tokenizer_module
from maisi.text.tokenizer import END_TOKEN, START_TOKEN, ClipTokenizer, find_clip_vocabulary

# Computed once with the library and checked by eye: "a", "photo", "of", "cat" are CLIP's well-known single
# tokens 320, 1125, 539, 2368; "pleural" and "effusion" split in two each ("ple"+"ural", "ef"+"fusion").
CHEST = [320, 10563, 343, 268, 3077, 593, 320, 2442, 1823, 926, 33948, 1490, 9364, 269]
PINNED = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "A chest X-ray with a small LEFT pleural effusion.": CHEST,
    "Large right lower lobe mass": [3638, 1155, 4909, 46325, 4854],
}


def test_pinned_prompts_give_start_tokens_end_then_zero_padding(clip_tokenizer):
    tokens = clip_tokenizer(list(PINNED))
    assert tokens.ids.shape == (3, 77) and tokens.ids.dtype == torch.int64 and tokens.cut == (0, 0, 0)
    for row, ids in zip(tokens.ids.tolist(), PINNED.values()):
        n = len(ids)
        assert row[: n + 2] == [START_TOKEN, *ids, END_TOKEN]
        assert row[n + 2 :] == [0] * (75 - n)  # SD-2.1 pads with "!" = 0, not with the end token
    words = clip_tokenizer._tokenizer.convert_ids_to_tokens([320, 1125, 539, 2368])
    assert words == ["a</w>", "photo</w>", "of</w>", "cat</w>"]


def test_lower_case_and_whitespace_do_not_change_the_ids(clip_tokenizer):
    a, b = clip_tokenizer(["a photo of a cat", "  A   PHOTO of a Cat "]).ids
    assert torch.equal(a, b)


def test_long_prompts_are_cut_to_77_keeping_the_end_token_and_say_how_many_were_cut(clip_tokenizer):
    tokens = clip_tokenizer(["cat " * 80, "the " * 75, "the " * 76])
    assert tokens.cut == (5, 0, 1)  # 75 prompt tokens fit between start and end
    for row in tokens.ids:
        assert row[0] == START_TOKEN and row[-1] == END_TOKEN and (row == END_TOKEN).sum() == 1
    assert (tokens.ids[0, 1:76] == 2368).all()


def test_null_prompts_as_trained_and_as_the_seed_sampled(clip_tokenizer):
    training = clip_tokenizer.null_tokens("training")
    assert training.tolist() == [START_TOKEN] + [END_TOKEN] * 76
    empty = clip_tokenizer.null_tokens("empty_string")
    assert empty.tolist() == [START_TOKEN, END_TOKEN] + [0] * 75
    with pytest.raises(InputError, match="null_prompt must be 'training' or 'empty_string', got 'none'"):
        clip_tokenizer.null_tokens("none")  # type: ignore[arg-type]


def test_prompts_must_be_a_list_of_strings(clip_tokenizer):
    with pytest.raises(InputError, match="prompts must be a list of strings"):
        clip_tokenizer("a photo of a cat")  # type: ignore[arg-type]


def test_a_vocabulary_other_than_the_pinned_file_is_refused(clip_vocabulary, tmp_path):
    other = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    other.write_bytes(gzip.compress(gzip.decompress(clip_vocabulary.read_bytes()) + b"x"))
    with pytest.raises(InputError, match="SHA-256|size"):
        find_clip_vocabulary(other)
    with pytest.raises(InputError, match="no such file"):
        find_clip_vocabulary(tmp_path / "missing.gz")


def test_no_vocabulary_anywhere_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tokenizer_module, "_installed_open_clip_vocabulary", lambda: None)
    with pytest.raises(InputError, match="fetch_clip_vocabulary"):
        find_clip_vocabulary()


def test_without_transformers_the_message_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.startswith("transformers"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(InputError, match=r"pip install -e '\.\[text\]'"):
        ClipTokenizer()

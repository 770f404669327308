"""``python -m maisi.masks index --no-progress`` shows no indexing bar (it goes through maisi.progress)."""

from __future__ import annotations

from maisi.masks.__main__ import main


def bars(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if "%|" in line or "it/s" in line]


def test_no_progress_silences_the_indexing_bar(masks_copy, capfd):
    args = ["index", "--masks", str(masks_copy / "masks"), "--output"]
    assert main([*args, str(masks_copy / "shown.json")]) == 0
    assert any("indexing" in line for line in bars(capfd.readouterr().err))
    assert main([*args, str(masks_copy / "quiet.json"), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert bars(err) == [], err
    assert (masks_copy / "quiet.json").is_file()

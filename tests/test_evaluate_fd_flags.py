"""``pipelines/evaluate.py``'s FD reference flags (``--fd-reference-split``, ``--fd-reference-images``,
``--fd-floor-split``): what they set, and the command-line errors (fast: parsing only)."""

from __future__ import annotations

import pytest

from pipelines.evaluate import fd_settings_from_args, parse_args
from pipelines.evaluation.fd_eval import FDSettings

BASE = ["--model", "m", "--shards", "s", "--fd", "4", "--fd-classifier", "c"]


def test_reference_flags_reach_the_fd_settings() -> None:
    assert fd_settings_from_args(parse_args(BASE)) == FDSettings(images=4, classifier="c")  # train, all, floor val
    chosen = fd_settings_from_args(parse_args([*BASE, "--fd-reference-split", "val", "--fd-reference-images", "6",
                                               "--fd-floor-split", "train"]))
    assert chosen == FDSettings(images=4, classifier="c", reference_split="val", reference_images=6, floor_split="train")


@pytest.mark.parametrize(("flags", "message"), [
    (["--fd-reference-images", "1"], "--fd-reference-images=1 must be >= 2"),
    (["--fd-reference-images", "-5"], "--fd-reference-images=-5 must be >= 2"),
    (["--fd-reference-images", "many"], "invalid int value: 'many'"),
    (["--fd-reference-split", "test"], "invalid choice: 'test'"),
    (["--fd-floor-split", "test"], "invalid choice: 'test'"),
])
def test_bad_reference_flags_exit_2_naming_the_flag(flags, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args([*BASE, *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err

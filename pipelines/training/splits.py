"""Which splits of the shards a training job may read: "train" (the Ray Train dataset) and "val"
(held-out bits/dim during training). The source's "test" split is never read by training; it is
scored by ``pipelines/evaluate.py --split test`` (``pipelines/data/shards/__init__.py``, "Splits").
"""

from __future__ import annotations

#: The only splits training reads.
TRAINING_SPLITS = ("train", "val")


def training_split(split: str) -> str:
    """``split`` itself when training may read it.

    Raises:
        ValueError: for any other split, "test" above all.
    """
    if split not in TRAINING_SPLITS:
        raise ValueError(f"training reads only the splits {TRAINING_SPLITS}, never {split!r}")
    return split

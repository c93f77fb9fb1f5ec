"""What an evaluation of a class-conditional model adds: which classes it samples (``--class-label``),
their names, and the class accuracy of its samples under the FD classifier.

Class labels are the shards' integer labels 0..K-1 (``UNetConfig.num_classes`` = K); -1 means "no
label". Names come from the shards' manifest (``classes``, name i = label i) when it names exactly K
classes, else labels are shown as their indices.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

ALL_CLASSES = "all"
"""The ``--class-label`` value that asks for every class of the model."""


def class_names(manifest_classes: Sequence[str], num_classes: int) -> tuple[str, ...]:
    """Display names of labels 0..K-1: the manifest's ``classes`` when it names exactly K, else the
    indices as strings."""
    if len(manifest_classes) == num_classes:
        return tuple(str(name) for name in manifest_classes)
    return tuple(str(k) for k in range(num_classes))


def resolve_class_labels(tokens: Sequence[str] | None, num_classes: int | None,
                         names: Sequence[str] = ()) -> tuple[int, ...] | None:
    """The labels ``--class-label`` asks for.

    Args:
        tokens: the flag's values: ``["all"]``, label indices ("5") or class names ("Sandal",
            matched exactly against ``names``, then case-insensitively); ``None``: the flag was
            not given (every class for a conditional model).
        num_classes: K of the model, ``None`` for an unconditional one.
        names: the classes' names (``class_names``), name i = label i.

    Returns:
        The labels, in the given order without repeats, each in [0, K); ``None`` for an
        unconditional model without the flag.

    Raises:
        ValueError: naming ``--class-label``: a label for an unconditional model, an index outside
            [0, K), an unknown name, or "all" mixed with other labels.
    """
    if num_classes is None:
        if tokens:
            raise ValueError(f"--class-label {' '.join(tokens)}: this model is unconditional "
                             "(UNetConfig.num_classes is null); it takes no class label")
        return None
    if not tokens or list(tokens) == [ALL_CLASSES]:
        return tuple(range(num_classes))
    if ALL_CLASSES in tokens:
        raise ValueError(f"--class-label: '{ALL_CLASSES}' cannot be combined with other labels, got {list(tokens)}")
    labels: list[int] = []
    for token in tokens:
        label = _one_label(token, num_classes, names)
        if label not in labels:
            labels.append(label)
    return tuple(labels)


def _one_label(token: str, num_classes: int, names: Sequence[str]) -> int:
    text = str(token).strip()
    if text.lstrip("-").isdigit():
        label = int(text)
        if not 0 <= label < num_classes:
            raise ValueError(f"--class-label {text}: labels of this model are 0..{num_classes - 1}")
        return label
    folded = [str(name).casefold() for name in names]
    if text in names:
        return list(names).index(text)
    if text.casefold() in folded:
        return folded.index(text.casefold())
    known = ", ".join(repr(n) for n in names) if names else f"indices 0..{num_classes - 1} only (no class names)"
    raise ValueError(f"--class-label {text!r} is not a class of this model; known: {known}")


def predicted_classes(classifier: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The argmax class of each image under ``classifier`` (logits ``[N, K']``): int64 ``[N]``.

    Args:
        classifier: the FD classifier (``evaluation.classifier.SmallCNN``, eval mode, CPU).
        images: float32 ``[N, C, H, W]`` in [-1, 1].
    """
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], np.float32))
            out.append(classifier(batch).argmax(dim=1).numpy().astype(np.int64))
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def class_accuracy(predicted: np.ndarray, asked: np.ndarray, classes: Sequence[int]) -> dict[str, float]:
    """How often the model drew the class it was asked for.

    Args:
        predicted: the classifier's class of each sample, int64 ``[N]``.
        asked: the label each sample was drawn with, int64 ``[N]``.
        classes: the labels to report one by one.

    Returns:
        ``{"sample_class_accuracy": overall fraction, "sample_class_accuracy_<k>": fraction for
        label k}`` in [0, 1] (a class without samples is left out).

    Raises:
        ValueError: if ``predicted`` and ``asked`` differ in length or are empty.
    """
    predicted, asked = np.asarray(predicted), np.asarray(asked)
    if predicted.shape != asked.shape or predicted.size == 0:
        raise ValueError(f"need as many predictions as samples (> 0), got {predicted.shape} and {asked.shape}")
    hits = predicted == asked
    out = {"sample_class_accuracy": float(hits.mean())}
    for k in classes:
        rows = asked == k
        if rows.any():
            out[f"sample_class_accuracy_{int(k)}"] = float(hits[rows].mean())
    return out

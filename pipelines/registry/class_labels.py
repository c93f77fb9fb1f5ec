"""Class labels of a class-conditional model as its users give them: a class index or a class name.

A served or logged model learns its class names from what travels with its checkpoint
(``model_class_names``): the checkpoint metadata key ``"class_names"`` (``config.json``, a list of
K names, name i = label i), else the ``classes`` of the training data's manifest logged beside it
(``manifest.json``; for IDX shards only when ``pipelines/preprocess.py --class-names`` named them).
A model with neither takes indices only. The HTTP app (``deploy/``) and the MLflow pyfunc resolve a
request's ``class_label`` here, so both accept and refuse the same values; the model itself takes
int64 labels in [-1, K), -1 = "no label" (``diffusion_core.guidance``). Plain Python, no torch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

CLASS_NAMES_KEY = "class_names"
"""Checkpoint metadata key of a conditional model's class names (list of K strings, name i = label i)."""

NO_LABEL = -1
"""The label of a row without a class: the model's "no label" (unconditional) input."""

ClassLabel = int | str
"""One request label: an index in [0, K) or one of the model's class names."""


def model_class_names(num_classes: int | None, metadata: Mapping[str, Any] | None,
                      manifest: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The class names of a model with ``num_classes`` K, name i for label i, or ``None`` when none
    are known (an unconditional model, or a conditional one whose checkpoint carries no names).

    Args:
        num_classes: K, ``None`` for an unconditional model.
        metadata: the checkpoint's metadata; its ``"class_names"`` (exactly K strings) is used first.
        manifest: the training data's manifest (or its summary); its ``"classes"`` is used when it
            holds exactly K names.

    Raises:
        ValueError: if ``metadata["class_names"]`` is present but is not K distinct non-empty strings
            (a checkpoint that names its classes wrongly is refused rather than served mislabelled).
    """
    if num_classes is None:
        return None
    given = (metadata or {}).get(CLASS_NAMES_KEY)
    if given is not None:
        if (not isinstance(given, list) or len(given) != num_classes or len(set(given)) != len(given)
                or not all(isinstance(name, str) and name.strip() for name in given)):
            raise ValueError(f"checkpoint metadata {CLASS_NAMES_KEY!r} must list {num_classes} distinct non-empty "
                             f"names (one per class), got {given!r}")
        return tuple(given)
    classes = (manifest or {}).get("classes")
    if isinstance(classes, list) and len(classes) == num_classes and all(isinstance(c, str) and c for c in classes):
        return tuple(classes)
    return None


def describe_classes(num_classes: int | None, class_names: Sequence[str] | None) -> list[dict[str, Any]] | None:
    """``[{"index": i, "name": name or None}, ...]`` for i in [0, K), or ``None`` for an unconditional model."""
    if num_classes is None:
        return None
    return [{"index": i, "name": class_names[i] if class_names else None} for i in range(num_classes)]


def check_class_label_value(value: Any) -> Any:
    """Check the form of a request's ``class_label`` (what needs no model): ``None``, an int >= 0, a
    non-empty string, or a non-empty list of those where ``None`` entries are rows without a label.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: on any other type (bool, float, dict, an empty list, a nested list), a negative
            index or an empty name; the message says what is accepted.
    """
    if value is None:
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list; give one label per image, or omit class_label")
        for i, entry in enumerate(value):
            if entry is not None:
                _check_one(entry, f"entry {i}: ")
        return value
    _check_one(value, "")
    return value


def _check_one(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}{value!r} is not a class index (an integer >= 0) or a class name (a string)")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{where}{value} is negative; class indices are >= 0 (omit class_label, or use null in a "
                         "list, for no label)")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{where}an empty class name")


def resolve_class_labels(value: Any, count: int, num_classes: int | None,
                         class_names: Sequence[str] | None) -> list[int] | None:
    """The model labels of a request's ``class_label`` for ``count`` images: int in [0, K) per image,
    ``NO_LABEL`` (-1) for an image without one; ``None`` when no label is given at all.

    A single label applies to every image, a list gives one per image (``None`` entries: no label). A
    name matches a class name exactly, or else case-insensitively when that match is unique.

    Args:
        value: the request's ``class_label`` (see ``check_class_label_value``).
        count: the number of images of the request.
        num_classes: K of the model, ``None`` for an unconditional model.
        class_names: the model's names (``model_class_names``), ``None`` when it has none.

    Raises:
        ValueError: if labels are given for an unconditional model, a list's length is not ``count``,
            an index is outside [0, K), a name is not a class of the model (the message lists them),
            or a name is given for a model without class names (indices only).
    """
    check_class_label_value(value)
    if value is None:
        return None
    if num_classes is None:
        raise ValueError("this model is unconditional (trained without class labels); omit class_label")
    if isinstance(value, list):
        if len(value) != count:
            raise ValueError(f"{len(value)} labels for {count} images; give one label per image, or a single label")
        return [NO_LABEL if v is None else _resolve_one(v, num_classes, class_names, f"entry {i}: ")
                for i, v in enumerate(value)]
    return [_resolve_one(value, num_classes, class_names, "")] * count


def _resolve_one(value: ClassLabel, num_classes: int, class_names: Sequence[str] | None, where: str) -> int:
    if isinstance(value, int):
        if value >= num_classes:
            raise ValueError(f"{where}class index {value} is out of range; this model's classes are 0..{num_classes - 1}")
        return value
    if not class_names:
        raise ValueError(f"{where}class name {value!r} cannot be resolved: this model carries no class names; "
                         f"give a class index 0..{num_classes - 1}")
    if value in class_names:
        return list(class_names).index(value)
    folded = [i for i, name in enumerate(class_names) if name.casefold() == value.casefold()]
    if len(folded) == 1:
        return folded[0]
    raise ValueError(f"{where}{value!r} is not a class of this model; its classes are "
                     f"{', '.join(f'{i}={name!r}' for i, name in enumerate(class_names))}")

"""The FD classifier (``pipelines.evaluation.classifier``) learns: on separable data its held-out
accuracy clears chance by a margin derived from the binomial law of a guesser (fast: no Ray, no MLflow)."""

from __future__ import annotations

import numpy as np
import scipy.stats
from _diffusion_helpers import single_thread  # noqa: F401 (autouse fixture)

from pipelines.evaluation.classifier import ClassifierConfig, accuracy, train_classifier

NUM_CLASSES = 4
SIZE = 16
#: The false-alarm rate of the accuracy bound: P(a guesser reaches it) <= 1e-6.
FALSE_ALARM = 1e-6


def quadrant_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images float32 ``[n, 1, 16, 16]`` in [-1, 1] and labels int64 ``[n]`` in [0, 4), balanced:
    class k is a bright 8x8 quadrant k (+0.8) on a dark background (-0.8), plus N(0, 0.3^2) pixel
    noise (clipped). Separable: the brightest quadrant is the label."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    images = np.full((n, 1, SIZE, SIZE), -0.8)
    half = SIZE // 2
    for i, k in enumerate(labels):
        row, col = divmod(int(k), 2)
        images[i, 0, row * half : (row + 1) * half, col * half : (col + 1) * half] = 0.8
    images += rng.normal(scale=0.3, size=images.shape)
    return np.clip(images, -1.0, 1.0).astype(np.float32), labels


def chance_bound(n: int, num_classes: int, false_alarm: float = FALSE_ALARM) -> float:
    """The accuracy a classifier that ignores its input exceeds with probability <= ``false_alarm``
    on ``n`` balanced labels: the upper ``false_alarm`` quantile of Binomial(n, 1/K) / n."""
    return float(scipy.stats.binom.isf(false_alarm, n, 1.0 / num_classes)) / n


def test_classifier_beats_chance_on_separable_data() -> None:
    images, labels = quadrant_images(160, seed=0)
    val_images, val_labels = quadrant_images(200, seed=1)
    config = ClassifierConfig(image_shape=(1, SIZE, SIZE), num_classes=NUM_CLASSES, channels=(8, 16), feature_dim=32)
    model, losses = train_classifier(images, labels, config, epochs=3, batch_size=32, lr=3e-3, seed=0)
    bound = chance_bound(len(val_labels), NUM_CLASSES)
    assert 0.25 < bound < 0.45  # 1/K plus about 4.9 binomial standard deviations
    assert accuracy(model, val_images, val_labels) > bound
    assert losses[-1] < losses[0]

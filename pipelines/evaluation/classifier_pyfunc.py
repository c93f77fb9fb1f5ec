"""The MLflow pyfunc of an FD classifier: ``predict(images)`` returns its features.

Logged with models-from-code (``classifier_pyfunc_entry.py``) by
``pipelines.registry.feature_store.log_feature_net``; its one artifact ``"weights"`` is the folder
of ``classifier.save_classifier``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mlflow.pyfunc import PythonModel

from pipelines.evaluation.classifier import ClassifierFeatures, load_classifier


class ClassifierFeaturesModel(PythonModel):
    """``predict(images)`` -> float64 features ``[N, D]``: ``images`` is a list of N images, each
    nested lists ``[C][H][W]`` of floats in [-1, 1] (a float32 array ``[N, C, H, W]`` as
    ``.tolist()`` gives it). ``predict`` is typed (MLflow 3's type-hint signatures: a ``list[...]``
    of instances), so MLflow infers the signature and checks every request against it."""

    def load_context(self, context: Any) -> None:
        model, _ = load_classifier(context.artifacts["weights"])
        self.net = ClassifierFeatures(model)

    def predict(self, context: Any, model_input: list[list[list[list[float]]]],
                params: dict[str, Any] | None = None) -> np.ndarray:
        """The classifier's features of ``model_input`` (see the class docstring), float64 ``[N, D]``.

        Raises:
            ValueError: if the images are not of the classifier's ``(C, H, W)``.
        """
        return self.net.features(np.asarray(model_input, dtype=np.float32))

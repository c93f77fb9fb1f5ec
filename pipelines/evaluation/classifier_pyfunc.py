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
    """``predict(float32 images [N, C, H, W] in [-1, 1])`` -> float64 features ``[N, D]``."""

    def load_context(self, context: Any) -> None:
        model, _ = load_classifier(context.artifacts["weights"])
        self.net = ClassifierFeatures(model)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        return self.net.features(np.asarray(model_input, dtype=np.float32))

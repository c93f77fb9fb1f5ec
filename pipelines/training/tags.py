"""The MLflow tags the training run carries besides its params and metrics."""

from __future__ import annotations

MODEL_URI_TAG = "ddpm.model_uri"
"""The final model of the run (registered when ``tracking.registered_model_name`` is set)."""

MODEL_STEP_TAG = "ddpm.model_step"
"""The step the final model was logged at: finalization runs once per final step."""

RESUMED_FROM_TAG = "ddpm.resumed_from_step"
"""The checkpoint step the latest (re)start of the worker group resumed from."""

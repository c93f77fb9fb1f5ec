"""Where the project's defaults live on disk when no path is given: the project folder itself.

``PROJECT_ROOT`` is the repository checkout (the folder holding ``pipelines/``, two levels above
this file). Defaults derived from it: the SQLite MLflow store (``registry.tracking_uri``) and the
training runs' storage folder (``training.config``). Every path a job logs is absolute.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STORAGE_PATH = str(PROJECT_ROOT / "runs")
DEFAULT_TRACKING_DB = PROJECT_ROOT / "mlflow.db"

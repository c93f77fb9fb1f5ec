"""The models-from-code file of the DDPM pyfunc: MLflow copies it into the logged model and runs
it when the model is loaded; its one statement names the model object (MLflow's ``set_model``)."""

from mlflow.models import set_model

from pipelines.registry.pyfunc_model import DDPMCheckpointModel

set_model(DDPMCheckpointModel())

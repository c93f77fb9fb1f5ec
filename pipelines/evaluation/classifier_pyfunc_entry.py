"""The models-from-code file of the FD classifier pyfunc: MLflow copies it into the logged model and
runs it when the model is loaded; its one statement names the model object (MLflow's ``set_model``)."""

from mlflow.models import set_model

from pipelines.evaluation.classifier_pyfunc import ClassifierFeaturesModel

set_model(ClassifierFeaturesModel())

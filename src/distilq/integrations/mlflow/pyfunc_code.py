"""The code MLflow runs to load a distilq model (MLflow's "models from code": nothing of
the model is unpickled). Its files are checked in `DistilqModel.load_context`."""

import mlflow

from distilq.integrations.mlflow.pyfunc import DistilqModel

mlflow.models.set_model(DistilqModel())

"""The MLflow mirror (mirror.py), what a version becomes in MLflow (logged.py), and the
`pyfunc` model that serves it (pyfunc.py). Imported only with the `mlflow` extra."""

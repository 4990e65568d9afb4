"""Integrations with the rest of a team's stack, one folder each, above the parts they read:
`mlflow/` mirrors the registry's versions and `production` into an MLflow model registry,
and serves a version as an MLflow `pyfunc` model."""

"""Everything that talks to MLflow: runs, metrics, artifacts and plots, the model registry and
promotion, the registered pyfunc model, and pulling a registered model to search or evaluate."""

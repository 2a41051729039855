"""Everything that talks to MLflow: runs, metrics, artifacts and plots, the model registry and
promotion, and the registered pyfunc model."""

"""Tracking: MLflow runs, the model registry and its champion rule, the logged pyfunc model."""

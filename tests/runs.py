"""What the tests that start real runs share."""

import os


def run_env(**extra: str) -> dict[str, str]:
    """A started run's environment: this one without $MLFLOW_TRACKING_URI (each run keeps its own MLflow store, not one
    the caller's environment points at), one intra-op thread, and `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env

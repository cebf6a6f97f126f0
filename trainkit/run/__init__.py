"""The run floor: a config made into a run, and everything a run leaves. `experiment.py` builds
every piece from a `TrainConfig`; `training.py` is `train(cfg)`, the Python API (this package
re-exports it); `rundir.py` writes the run folder and resumes from it; `reports.py`
shows the numbers (console, plots, tables); `tracking.py` sends them to MLflow. It imports the
loop and everything below it, never a command.
"""
from .training import RunResult, train

__all__ = ["RunResult", "train"]

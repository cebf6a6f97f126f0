"""trainkit: a small, readable, fast training loop for image classifiers, starting from MNIST."""
from .config import RECIPES, TrainConfig
from .data import DATASETS, ImageData, load_dataset
from .data.loaders import SeedAugment, TensorLoader, torchvision_loader
from .errors import TrainkitError
from .loop import callbacks
from .loop.callbacks import EMA, EarlyStopping, GradientClipping, TargetAccuracy
from .loop.engine import Callback, EpochResult, Evaluation, History, TrainState, evaluate, fit, train_one_epoch
from .loop.optim import OPTIMIZERS, SCHEDULERS
from .models import MODELS, build_model, count_parameters, register_model
from .run import reports
from .run.assembly import Run, build_run
from .run.experiment import build_experiment
from .run.reports import ConsoleLogger
from .run.training import RunResult, train

__all__ = ["RECIPES", "TrainConfig", "ImageData", "load_dataset", "DATASETS", "EpochResult", "Evaluation",
           "History", "Callback", "TrainState", "evaluate", "fit", "train_one_epoch", "TrainkitError",
           "SeedAugment", "TensorLoader", "torchvision_loader", "MODELS", "build_model", "count_parameters",
           "register_model", "OPTIMIZERS", "SCHEDULERS", "RunResult", "build_experiment", "train", "reports",
           "callbacks", "ConsoleLogger", "Run", "build_run", "EMA", "EarlyStopping", "GradientClipping", "TargetAccuracy"]
__version__ = "0.1.0"

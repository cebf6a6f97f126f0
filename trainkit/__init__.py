"""trainkit: a small, readable, fast training loop for image classifiers, starting from MNIST."""
from . import callbacks, reports
from .assembly import Run, build_run
from .callbacks import EMA, EarlyStopping, GradientClipping, TargetAccuracy
from .config import RECIPES, TrainConfig
from .data import DATASETS, ImageData, load_dataset
from .engine import Callback, EpochResult, Evaluation, History, TrainState, evaluate, fit, train_one_epoch
from .errors import TrainkitError
from .experiment import build_experiment
from .loaders import SeedAugment, TensorLoader, torchvision_loader
from .models import MODELS, build_model, count_parameters, register_model
from .optim import OPTIMIZERS, SCHEDULERS
from .reports import ConsoleLogger
from .run import RunResult, train

__all__ = ["RECIPES", "TrainConfig", "ImageData", "load_dataset", "DATASETS", "EpochResult", "Evaluation",
           "History", "Callback", "TrainState", "evaluate", "fit", "train_one_epoch", "TrainkitError",
           "SeedAugment", "TensorLoader", "torchvision_loader", "MODELS", "build_model", "count_parameters",
           "register_model", "OPTIMIZERS", "SCHEDULERS", "RunResult", "build_experiment", "train", "reports",
           "callbacks", "ConsoleLogger", "Run", "build_run", "EMA", "EarlyStopping", "GradientClipping", "TargetAccuracy"]
__version__ = "0.1.0"

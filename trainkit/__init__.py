"""trainkit: a small, readable, fast training loop for image classifiers, starting from MNIST."""
from . import reports
from .config import RECIPES, TrainConfig
from .datasets import ImageData, load_dataset
from .engine import EpochResult, History, evaluate, fit, train_one_epoch
from .errors import TrainkitError
from .loaders import SeedAugment, TensorLoader, torchvision_loader
from .models import MODELS, build_model, count_parameters, register_model
from .run import RunResult, build_experiment, train

__all__ = ["RECIPES", "TrainConfig", "ImageData", "load_dataset", "EpochResult", "History", "evaluate",
           "fit", "train_one_epoch", "TrainkitError", "SeedAugment", "TensorLoader", "torchvision_loader",
           "MODELS", "build_model", "count_parameters", "register_model", "RunResult", "build_experiment",
           "train", "reports"]
__version__ = "0.1.0"

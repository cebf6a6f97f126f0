"""trainkit: a small, readable, fast training loop for image classifiers, starting from MNIST."""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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

# Where each module of the flat layout went when the package took its floors (docs/architecture.md).
# `import trainkit.engine` (a user's callback, an older script) still gets trainkit.loop.engine, with a
# DeprecationWarning naming the new place.
MOVED = {"loaders": "data.loaders", "stream": "data.stream", "preprocess": "data.preprocess",
         "pretrained": "models.pretrained", "engine": "loop.engine", "callbacks": "loop.callbacks",
         "devices": "loop.devices", "distributed": "loop.distributed", "optim": "loop.optim",
         "experiment": "run.experiment", "rundir": "run.rundir", "reports": "run.reports",
         "tracking": "run.tracking", "cli": "commands.cli", "flags": "commands.flags", "bench": "commands.bench",
         "lr_find": "commands.lr_find", "inference": "commands.inference", "serve": "commands.serve",
         "serve_page": "commands.serve_page", "compare": "commands.compare", "tune": "commands.tune"}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `trainkit.<old name>` and hands back the module at its new place (the import system
    returns what `exec_module` leaves in sys.modules under the old name)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        new = f"{__name__}.{MOVED[module.__name__.rpartition('.')[2]]}"
        warnings.warn(f"{module.__name__} is now {new}", DeprecationWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(new)


if not any(isinstance(finder, _OldNames) for finder in sys.meta_path):
    sys.meta_path.append(_OldNames())

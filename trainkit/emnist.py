"""EMNIST now lives in trainkit/data/emnist.py; this module re-exports its names."""
from .data.emnist import ARCHIVE, ARCHIVE_BYTES, SPLITS, EmnistSplit, load_emnist  # noqa: F401

"""Datasets for the calibration study: discover, check, preprocess and cache subjects; folds; phantoms.

Public API (what the sweep and the tests import; formats in docs/architecture.md, "File formats"):
``SUPPORTED_DATASETS``, ``write_phantoms``, ``check_dataset`` / ``CheckReport`` / ``Problem``,
``preprocess_dataset``, ``load_subject`` / ``Subject``, ``read_meta``, ``make_folds`` /
``read_folds`` (and ``write_folds``), ``DataError``.
Command line: ``python -m calib.data {phantom,check,preprocess,folds} --help``.
torch and MONAI are imported only when a subject is actually preprocessed.
"""

from .cache import Subject, load_subject, read_meta
from .check import check_dataset, check_subject
from .errors import CheckReport, DataError, Problem
from .folds import make_folds, paper_folds_file, read_folds, write_folds
from .layouts import SUPPORTED_DATASETS, discover
from .phantom import write_phantoms
from .preprocess import PreprocessConfig, preprocess_dataset

__all__ = [
    "SUPPORTED_DATASETS",
    "CheckReport",
    "DataError",
    "PreprocessConfig",
    "Problem",
    "Subject",
    "check_dataset",
    "check_subject",
    "discover",
    "load_subject",
    "make_folds",
    "paper_folds_file",
    "preprocess_dataset",
    "read_folds",
    "read_meta",
    "write_folds",
    "write_phantoms",
]

"""A reproducible training pipeline for convolutional image classifiers.

Stages (one module each, same names as in dvc.yaml): prepare -> build -> train -> evaluate.
"""

import os

from pipeline import quiet_import

# Before TensorFlow is first imported: keep its start-up log quiet unless asked for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
quiet_import.install("tensorflow")

__version__ = "0.1.0"

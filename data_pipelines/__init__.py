"""Data side of jedi-train: build same-subject image sets (synth/), stream them for training (stream)."""
from data_pipelines import quiet  # noqa: F401  (before any diffusers import: see quiet.py)

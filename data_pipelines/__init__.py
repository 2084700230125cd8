"""Data side of jedi-train: build same-subject image sets (synth/), stream them for training (stream)."""
from . import quiet  # noqa: F401  (before any diffusers import: see quiet.py)

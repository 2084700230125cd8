"""Data side of jedi-train: build same-subject image sets (synth/), stream them for training (stream)."""
import jedi_common.quiet  # noqa: F401  (before any diffusers import: see quiet.py)

"""Data side of jedi-train: build same-subject image sets (synth/), stream them for training (stream)."""

"""JeDiModule on in-memory data, for test_module.py and the fit_tiny.py script: SameSets (an endless dataset
of sets of 3 made-up images) and make_module (the module with a small LR and EMA)."""
import torch
from torch.utils.data import Dataset

from jedi_train.models.components import tokenize
from jedi_train.training.module import JeDiModule


class SameSets(Dataset):
    """Sets of 3 (1 reference); item i is seeded by i, optionally poisoned with NaN."""

    def __init__(self, tokenizer, nan_from: int | None = None):
        self.ids = tokenize(tokenizer, ["a photo of a mug on the beach"] * 3)
        self.nan_from = nan_from

    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(0)
        px = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
        if self.nan_from is not None and i >= self.nan_from:
            px = px * float("nan")
        return {"pixel_values": px, "input_ids": self.ids, "is_ref": torch.tensor([True, False, False]),
                "valid": torch.ones(3, dtype=torch.bool)}


def make_module(model_dir, **kw):
    return JeDiModule(model_dir=model_dir, optimizer={"lr": 1e-3}, ema={"enabled": True, "decay": 0.9}, **kw)

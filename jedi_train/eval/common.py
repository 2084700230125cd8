"""What both benchmarks share: the one-line error, bootstrap CIs, loading the pipeline, atomic files."""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from jedi_common.atomic import atomic_path, atomic_write_text


class EvalError(Exception):
    """Bad input: printed as one `jedi-eval: error:` line, exit 2."""


def bootstrap_ci(values: Sequence[float] | np.ndarray, stat: Callable[[np.ndarray], float] | None = None,
                 n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat` (default: the mean) over the rows of `values` (resampled whole:
    a row is one subject, so the CI is over subjects). `stat` receives a resampled (n, ...) array."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    stat = stat or (lambda a: float(np.mean(a)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    boots = np.array([stat(x[i]) for i in idx])
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return (float("nan"), float("nan"))
    return (float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2)))


def load_pipeline(pipeline_dir: str, device: str | None = None):
    """A JeDiPipeline from an export dir, or EvalError naming what is wrong."""
    import torch

    from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

    if not os.path.isdir(pipeline_dir):
        raise EvalError(f"pipeline directory {pipeline_dir} does not exist; give the folder jedi-export wrote")
    index = os.path.join(pipeline_dir, "model_index.json")
    if not os.path.isfile(index):
        raise EvalError(f"{pipeline_dir} has no model_index.json, so it is not a saved pipeline; export one with "
                        "jedi-export CHECKPOINT OUT_DIR")
    with open(index) as f:
        cls = json.load(f).get("_class_name")
    if isinstance(cls, list) and len(cls) == 2:  # ["jedi_pipeline", "JeDiPipeline"]: bundled code (bundle.py)
        cls = cls[1]
    if cls != "JeDiPipeline":
        raise EvalError(f"{pipeline_dir} holds a {cls}, not a JeDiPipeline; give a directory jedi-export wrote")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = JeDiPipeline.from_pretrained(pipeline_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_json_atomic(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv_atomic(path: str, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def parse_int_list(text: str, name: str, low: int = 0) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{name} {text!r} is not a comma-separated list of integers (e.g. {name} 0,1,3)") from None
    if not values or min(values) < low:
        raise EvalError(f"{name} {text!r} needs integers >= {low} (e.g. {name} 1,3)")
    return values


def parse_float_list(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{name} {text!r} is not a comma-separated list of numbers (e.g. {name} 0,1,3)") from None
    if not values or min(values) < 0:
        raise EvalError(f"{name} {text!r} needs numbers >= 0 (e.g. {name} 0,1,3)")
    return values

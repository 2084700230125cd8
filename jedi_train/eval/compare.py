"""B minus A, paired: two `jedi-eval procedural` results on the same held-out subjects, seeds and cells.

An A/B of two recipes scores the same subjects in the same scenes from the same sampling noise, so their
difference is measured far more tightly than two separate CIs suggest: each bootstrap draw resamples
subjects once and recomputes both runs' figures on that draw (paired bootstrap over subjects). Reported per
cell: colour gap closed, nearest-subject and scene accuracy, each detail attribute's gap closed and
sharpness, as A, B and B - A with its 95% CI. A difference whose CI contains 0 is within the noise.

Refused (one line) when the two evaluations differ in a setting that changes what is scored (subjects,
seed, samples, cells, guidance, steps, layout): their images would not be paired.
"""
from __future__ import annotations

import csv
import functools
import json
import os

import numpy as np

from jedi_train.eval import details
from jedi_train.eval.common import EvalError, bootstrap_ci, write_json_atomic
from jedi_train.eval.procedural import gap_closed

PAIRED_SETTINGS = ("subjects", "seed", "samples", "guidance", "steps", "layout", "refs", "image_guidance")


def add_arguments(p) -> None:
    p.add_argument("a", metavar="A_DIR", help="the baseline's jedi-eval procedural --out directory")
    p.add_argument("b", metavar="B_DIR", help="the candidate's --out directory (same subjects, seed and cells)")
    p.add_argument("--out", metavar="DIR", help="also write compare.md and compare.json here")


def load(out_dir: str) -> tuple[dict, list[dict]]:
    """settings.json and per_image.csv of a finished evaluation (numbers parsed; blanks -> None)."""
    paths = [os.path.join(out_dir, f) for f in ("settings.json", "per_image.csv", "summary.json")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise EvalError(f"{out_dir} is not a finished jedi-eval procedural result ({os.path.basename(missing[0])} "
                        "is missing); run jedi-eval procedural --out there first")
    with open(paths[0]) as f:
        settings = json.load(f)
    with open(paths[1], newline="") as f:
        rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return settings, rows


def _number(v: str):
    if v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v


def check_paired(a: dict, b: dict) -> None:
    for key in PAIRED_SETTINGS:
        if a.get(key) != b.get(key):
            raise EvalError(f"the two evaluations differ in {key} ({a.get(key)!r} vs {b.get(key)!r}), so their "
                            f"images are not paired; rerun one with the other's --{key.replace('_', '-')}")


def _per_subject(rows: list[dict], subjects: list[int], columns: tuple[str, ...]) -> np.ndarray:
    """(n_subjects, len(columns)) means over each subject's images (rows with a blank column left out)."""
    out = []
    for s in subjects:
        sel = [[r[c] for c in columns] for r in rows if r["subject"] == s and all(r[c] is not None for c in columns)]
        out.append(np.mean(sel, axis=0) if sel else np.full(len(columns), np.nan))
    return np.array(out, dtype=np.float64)


def _mean(x: np.ndarray) -> float:
    return float(x[:, 0].mean())


def metrics() -> list[tuple[str, tuple[str, ...], object]]:
    """(name, per-image columns, statistic over a (n_subjects, columns) array)."""
    out = [("gap_closed", ("distance", "chance", "ceiling"), gap_closed),
           ("nearest_subject_acc", ("nearest_is_true",), _mean),
           ("scene_acc", ("scene_correct",), _mean)]
    for a in details.ATTRIBUTES:
        out.append((f"{a}_gap_closed", (f"detail_{a}", f"{a}_ceiling", f"{a}_k"), _detail_gap))
    out.append(("sharpness", ("sharp_hf", "sharp_ref"), details.sharpness_ratio))
    return out


def _detail_gap(rows: np.ndarray) -> float:
    return details.detail_gap(rows[:, :2], round(float(rows[0, 2])))


def compare_cell(rows_a: list[dict], rows_b: list[dict], seed: int) -> dict:
    subjects = sorted({int(r["subject"]) for r in rows_a} & {int(r["subject"]) for r in rows_b})
    out = {"n_subjects": len(subjects)}
    for name, columns, stat in metrics():
        if not rows_a or not all(c in rows_a[0] and c in rows_b[0] for c in columns):
            continue  # an evaluation run with --details off has no detail columns
        pa, pb = _per_subject(rows_a, subjects, columns), _per_subject(rows_b, subjects, columns)
        keep = ~(np.isnan(pa).any(1) | np.isnan(pb).any(1))  # subjects that have the attribute
        if not keep.any():
            continue
        both = np.stack([pa[keep], pb[keep]], axis=1)  # (n, 2, columns): resampled together
        diff = functools.partial(_difference, stat=stat)
        lo, hi = bootstrap_ci(both, diff, seed=seed)
        out[name] = {"a": stat(both[:, 0]), "b": stat(both[:, 1]), "diff": diff(both), "diff_ci": [lo, hi],
                     "n_subjects": int(keep.sum())}
    return out


def _difference(both: np.ndarray, stat) -> float:
    return stat(both[:, 1]) - stat(both[:, 0])


def compare(a_dir: str, b_dir: str) -> dict:
    (sa, ra), (sb, rb) = load(a_dir), load(b_dir)
    check_paired(sa, sb)
    cells = sorted({(r["refs"], r["image_guidance"]) for r in ra})
    rows = []
    for cell in cells:
        sel_a = [r for r in ra if (r["refs"], r["image_guidance"]) == cell]
        sel_b = [r for r in rb if (r["refs"], r["image_guidance"]) == cell]
        rows.append({"refs": int(cell[0]), "image_guidance": cell[1], **compare_cell(sel_a, sel_b, sa["seed"])})
    return {"a": os.path.abspath(a_dir), "b": os.path.abspath(b_dir), "rows": rows}


def _pct(name: str, v: float) -> str:
    return f"{100 * v:.1f}%" if "gap" in name else f"{v:.3f}"


def markdown(result: dict) -> str:
    lines = ["# jedi-eval compare: B - A, paired over subjects", "", f"A: {result['a']}", f"B: {result['b']}", "",
             "| refs | image guidance | figure | A | B | B - A (95% CI) | subjects |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for name, _, _ in metrics():
            if name not in row:
                continue
            m = row[name]
            lo, hi = m["diff_ci"]
            noise = " (within noise)" if lo <= 0 <= hi else ""
            lines.append(f"| {row['refs']} | {row['image_guidance']:g} | {name} | {_pct(name, m['a'])} | "
                         f"{_pct(name, m['b'])} | {_pct(name, m['diff'])} ({_pct(name, lo)}, {_pct(name, hi)}){noise} "
                         f"| {m['n_subjects']} |")
    lines += ["", "Paired bootstrap over subjects: each draw recomputes both runs' figures on the same subjects."]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from jedi_common.atomic import atomic_write_text

    result = compare(args.a, args.b)
    text = markdown(result)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        atomic_write_text(os.path.join(args.out, "compare.md"), text)
        write_json_atomic(os.path.join(args.out, "compare.json"), result)
    print(text)
    return 0

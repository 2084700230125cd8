"""results.csv and report.html of a jedi-generate --out, rebuilt from the per-image records on disk (so every
shard's images are in them, whichever shard finished last; `jedi-generate report --out DIR` rebuilds them).

report.html: one section per job (references | accepted | rejected, each image with its prompt and scores, and
with --explain its reference attention overlays beside it); images are linked by relative paths, so the folder
is viewable offline and can be copied as a whole.
"""
from __future__ import annotations

import glob
import html
import json
import os

from jedi_common.atomic import atomic_write_text
from jedi_train.eval.common import write_csv_atomic

COLUMNS = ("job", "prompt_index", "prompt", "sample", "image", "status", "seed", "identity", "prompt_score",
           "pass", "attempts", "joint")


def collect(out: str) -> list[dict]:
    """Every image record under out, by job then prompt then sample."""
    records = []
    for path in glob.glob(os.path.join(glob.escape(out), "*", "[0-9][0-9]_[0-9][0-9].json")):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):  # one being written by another shard: the next report has it
            continue
        if isinstance(rec, dict) and "job" in rec:
            records.append(rec)
    return sorted(records, key=lambda r: (r["job"], r["prompt_index"], r["sample"]))


def rows(records: list[dict]) -> list[dict]:
    return [{"job": r["job"], "prompt_index": r["prompt_index"], "prompt": r["prompt"], "sample": r["sample"],
             "image": r["image"], "status": r["status"], "seed": r["seed"],
             "identity": r["scores"].get("identity", ""), "prompt_score": r["scores"].get("prompt", ""),
             "pass": "" if r["pass"] is None else r["pass"], "attempts": r["attempts"], "joint": r["joint"]}
            for r in records]


def write_reports(out: str) -> list[dict]:
    records = collect(out)
    if records:
        write_csv_atomic(os.path.join(out, "results.csv"), rows(records))
    else:  # the header alone
        atomic_write_text(os.path.join(out, "results.csv"), ",".join(COLUMNS) + "\n")
    atomic_write_text(os.path.join(out, "report.html"), html_report(records, {r["image"]: overlays(out, r["image"])
                                                                              for r in records}))
    return records


def overlays(out: str, image: str) -> list[str]:
    """The --explain overlays of an image (<stem>.attention.<k>.png beside it), relative to out, by reference."""
    stem = os.path.join(out, os.path.splitext(image)[0])
    found = glob.glob(glob.escape(stem) + ".attention.*.png")
    return [os.path.relpath(p, out) for p in sorted(found, key=lambda p: int(p.rsplit(".", 2)[-2]))]


def _scores(scores: dict) -> str:
    return " · ".join(f"{k} {v:.3f}" for k, v in scores.items())


def _figure(src: str, caption: str, cls: str = "") -> str:
    return (f'<figure class="{cls}"><a href="{html.escape(src)}"><img src="{html.escape(src)}" loading="lazy"></a>'
            f"<figcaption>{caption}</figcaption></figure>")


def _explained(files: list[str]) -> str:
    return "".join(_figure(src, f"attention on reference {k}", "attention") for k, src in enumerate(files))


def html_report(records: list[dict], explained: dict[str, list[str]] | None = None) -> str:
    explained = explained or {}
    jobs: dict[str, list[dict]] = {}
    for r in records:
        jobs.setdefault(r["job"], []).append(r)
    n_acc = sum(r["status"] == "accepted" for r in records)
    first = records[0] if records else {}
    gate = ", ".join(f"{k} >= {v:g}" for k, v in (first.get("thresholds") or {}).items()) or "none"
    parts = [(f"<h1>jedi-generate report</h1><p>{len(records)} images in {len(jobs)} jobs: {n_acc} accepted, "
              f"{len(records) - n_acc} rejected. Identity metric: {html.escape(str(first.get('metric') or 'none'))}; "
              f"thresholds: {html.escape(gate)}.</p>")]
    for job_id, recs in jobs.items():
        acc = [r for r in recs if r["status"] == "accepted"]
        rej = [r for r in recs if r["status"] == "rejected"]
        mode = "one joint set" if recs[0]["joint"] else "independent images"
        parts.append(f'<section id="{html.escape(job_id)}"><h2>{html.escape(job_id)}</h2>'
                     f"<p>{len(acc)} accepted, {len(rej)} rejected ({mode})</p>")
        parts.append('<h3>references</h3><div class="row">' + "".join(
            _figure(src, f"reference {i}") for i, src in enumerate(recs[0].get("references", []))) + "</div>")
        parts.append('<h3>accepted</h3><div class="row">' + "".join(
            _figure(r["image"], f"{html.escape(r['prompt'])}<br>{_scores(r['scores'])}"
                    f"<br>try {next(c['attempt'] for c in r['candidates'] if c['seed'] == r['seed']) + 1} of "
                    f"{r['attempts']}") + _explained(explained.get(r["image"], [])) for r in acc) + "</div>")
        if rej:
            parts.append('<h3>rejected</h3><div class="row">' + "".join(
                _figure(c["file"], f"{html.escape(r['prompt'])}<br>try {c['attempt'] + 1}: {_scores(c['scores'])}"
                        + (" (best)" if c["seed"] == r["seed"] else ""), "rejected")
                + (_explained(explained.get(r["image"], [])) if c["file"] == r["image"] else "")
                for r in rej for c in r["candidates"] if c["file"]) + "</div>")
        parts.append("</section>")
    style = ("body{font-family:sans-serif;margin:1em 2em}.row{display:flex;flex-wrap:wrap;gap:8px}"
             "figure{margin:0;width:160px;font-size:12px}img{width:160px;height:160px;object-fit:contain;"
             "image-rendering:pixelated;border:1px solid #ccc}.rejected img{border-color:#c33}.attention img{border-color:#36c}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>jedi-generate report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")

"""The exported pipeline as a W&B model artifact, so a sweep's best model is found from the W&B UI.

One artifact per run (`pipeline-<run id>`), a new version per export (a resumed run exports again),
aliases `latest`, `step-N` and `best` (the version with the best `optimized_metric` so far in this
run; the best value is kept in RUN_DIR/artifacts.json so resumes continue the comparison). Offline
runs stage the artifact in their offline files; `wandb sync` uploads it with the run. The last
checkpoint can be logged too (`log_checkpoint_artifact=true`: `checkpoint-<run id>`, aliases `latest` and
`step-N`); Lightning's own `logger.log_model` refuses offline runs, this works in both.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from jedi_common.atomic import atomic_write_text


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_offline() -> bool:
    """Offline-first, like every W&B use here: no API key (or WANDB_MODE=offline) means no network."""
    return not wandb_key_configured() or os.environ.get("WANDB_MODE") == "offline"


def log_pipeline_artifact(logger, pipeline_dir: str, step: int, metrics: dict, metric: str | None,
                          run_dir: str, mode: str = "min") -> list[str] | None:
    """Log pipeline_dir as a model artifact of the logger's W&B run; the aliases given, or None when the
    logger is not a WandbLogger."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return None
    import wandb

    run = logger.experiment
    value = metrics.get(metric) if metric else None
    state_file = os.path.join(run_dir, "artifacts.json")
    try:
        with open(state_file) as f:
            best = json.load(f).get("best")
    except (OSError, ValueError):
        best = None
    aliases = ["latest", f"step-{step}"]
    if value is not None and (best is None or (value < best if mode == "min" else value > best)):
        aliases.append("best")
        atomic_write_text(state_file, json.dumps({"metric": metric, "best": value, "step": step}) + "\n")
    artifact = wandb.Artifact(f"pipeline-{run.id}", type="model",
                              description="JeDi pipeline exported by jedi-train (diffusers format)",
                              metadata={"step": step, "metric": metric, "value": value})
    artifact.add_dir(pipeline_dir)
    run.log_artifact(artifact, aliases=aliases)
    return aliases


def log_checkpoint_artifact(logger, ckpt_path: str, step: int) -> bool:
    """Log one checkpoint file (or DeepSpeed checkpoint dir) as `checkpoint-<run id>`; False without W&B."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or not os.path.exists(ckpt_path):
        return False
    import wandb

    run = logger.experiment
    artifact = wandb.Artifact(f"checkpoint-{run.id}", type="model", metadata={"step": step},
                              description="jedi-train Lightning checkpoint (resume with ckpt_path=...)")
    if os.path.isdir(ckpt_path):
        artifact.add_dir(ckpt_path, name=os.path.basename(ckpt_path))
    else:
        artifact.add_file(ckpt_path)
    run.log_artifact(artifact, aliases=["latest", f"step-{step}"])
    return True


def log_eval_to_run(pipeline_dir: str | None, name: str, rows: list[dict], columns: list[str],
                    grids: list[str]) -> str | None:
    """Log a jedi-eval summary (a table and its grids) to the W&B run that trained the evaluated export,
    resuming it (offline without an API key, like training). The run id, or None if there is no run."""
    from jedi_train.export.model_card import find_run_dir, run_config, run_wandb_id

    run_dir = find_run_dir(pipeline_dir)
    run_id = run_wandb_id(run_dir)
    if run_id is None:
        return None
    import wandb

    project = (run_config(run_dir).get("logger") or {}).get("project") or "jedi-train"
    run = wandb.init(id=run_id, resume="allow", project=project, dir=run_dir,
                     mode="offline" if wandb_offline() else "online", settings=wandb.Settings(silent=True))
    try:
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        run.log({f"{name}/table": table, f"{name}/grids": [wandb.Image(p) for p in grids]})
        for r in rows:
            key = f"{name}/refs{r.get('refs')}" + (f"_ig{r['image_guidance']}" if "image_guidance" in r else "")
            run.summary.update({f"{key}/{c}": r[c] for c in columns if isinstance(r.get(c), (int, float))})
    finally:
        run.finish()
    return run_id

"""`make train` / `make proof`: the embedded default end to end, measured, then a summary.

Runs `jedi-train experiment=demo` (procedural sets synthesized on first use, tiny pixel model,
CPU), which trains, checkpoints, renders sample grids and exports the pipeline; then `jedi-eval
procedural` on held-out subjects (does the exported model carry identity from its references?);
then prints the run dir, grids, the loss curve, the identity figures and where everything is.
`--proof`: experiment=proof (a longer run) and the full refs x image-guidance table; `experiment=NAME`
among the overrides trains that experiment instead (e.g. `--proof experiment=proof_gpu`, 64 px).
Extra arguments are Hydra overrides, e.g. `make train ARGS="trainer.max_steps=300"`.
"""
import csv
import glob
import os
import shutil
import subprocess
import sys
import time

DEMO_EVAL = ["--subjects", "32", "--refs", "0,1", "--image-guidance", "1,3", "--guidance", "3", "--samples", "2"]
PROOF_EVAL = ["--subjects", "64", "--refs", "0,1,3", "--image-guidance", "0,1,3", "--guidance", "3", "--samples", "2"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    proof = "--proof" in argv
    argv = [a for a in argv if a != "--proof"]
    experiment = "proof" if proof else "demo"
    named = [a for a in argv if a.startswith("experiment=")]  # a variant, e.g. experiment=proof_gpu (64 px)
    if named:
        experiment = named[-1].split("=", 1)[1]
        argv = [a for a in argv if not a.startswith("experiment=")]
    if not any(a.startswith("paths.output_dir=") for a in argv):
        argv.append(f"paths.output_dir={os.path.abspath(f'runs/{experiment}-' + time.strftime('%Y%m%d-%H%M%S'))}")
    run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("paths.output_dir="))
    cmd = [sys.executable, "-m", "jedi_train.cli.train", f"experiment={experiment}", *argv]
    print("$ jedi-train " + " ".join(cmd[3:]), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"training failed (exit {rc}); rerun the same command to resume from {run_dir}/checkpoints/last.ckpt")
        return rc
    train_minutes = (time.time() - t0) / 60
    eval_dir = os.path.join(run_dir, "eval")
    shutil.rmtree(eval_dir, ignore_errors=True)  # a resumed run exported a new pipeline: measure it afresh
    eval_cmd = [sys.executable, "-m", "jedi_train.cli.eval", "procedural", os.path.join(run_dir, "pipeline"),
                "--out", eval_dir, *(PROOF_EVAL if proof else DEMO_EVAL)]
    print(f"$ jedi-eval {' '.join(eval_cmd[3:])}", flush=True)
    eval_rc = subprocess.call(eval_cmd)
    minutes = (time.time() - t0) / 60
    grids = sorted(glob.glob(os.path.join(run_dir, "samples", "samples_step*.png")))
    with open(os.path.join(run_dir, "loss_curve.csv")) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    w = max(1, min(50, len(losses) // 2))
    print(f"\n=== jedi-train {experiment}: done in {minutes:.1f} min ({train_minutes:.1f} training) ===")
    print(f"run dir          {run_dir}")
    print(f"checkpoints      {run_dir}/checkpoints/last.ckpt")
    print(f"sample grid      {grids[-1] if grids else '(none)'}   (refs | generated | real)")
    print(f"loss curve       {run_dir}/loss_curve.png")
    print(f"exported pipe    {run_dir}/pipeline   (JeDiPipeline.from_pretrained / jedi-sample)")
    print(f"W&B              {run_dir}/wandb   (offline without an API key: wandb sync {run_dir}/wandb/offline-run-*)")
    if losses:
        print(f"training loss    first {w} steps {sum(losses[:w]) / w:.4f} -> last {w} steps "
              f"{sum(losses[-w:]) / w:.4f} (steps {rows[0]['step']}..{rows[-1]['step']})")
    gain_csv = os.path.join(run_dir, "samples", "identity_gain.csv")
    if os.path.exists(gain_csv):
        with open(gain_csv) as f:
            gains = list(csv.DictReader(f))
        if gains:
            g = gains[-1]
            line = (f"identity gain    held-out {float(g['identity_gain']):+.4f} ± {1.96 * float(g['identity_gain_se']):.4f}"
                    f" (95% CI) at step {g['step']}")
            if "identity_gain_train" in g:
                line += f"; training sets {float(g['identity_gain_train']):+.4f} ± {1.96 * float(g['identity_gain_train_se']):.4f}"
            print(line + "   (subject-pixel error without vs with the reference; > 0: references used)")
    summary = os.path.join(eval_dir, "summary.json")
    if eval_rc == 0 and os.path.exists(summary):
        import json

        from jedi_train.eval.details import summary_line

        with open(summary) as f:
            rows = json.load(f)["rows"]
        for r in rows:
            lo, hi = r["gap_closed_ci"]
            print(f"identity         refs {r['refs']} (image guidance {r['image_guidance']:g}): gap closed "
                  f"{100 * r['gap_closed']:+.1f}% (95% CI {100 * lo:+.1f} .. {100 * hi:+.1f}), nearest subject "
                  f"{r['nearest_subject_acc']:.2f} (chance 0.12), scene {r['scene_acc']:.2f}")
            if "sharpness" in r:
                print(f"details          refs {r['refs']} (image guidance {r['image_guidance']:g}): {summary_line(r)}")
        print(f"eval             {eval_dir}/summary.md, grids {eval_dir}/grids/   (refs | generated | ground truth)")
    else:
        why = f"failed (exit {eval_rc})" if eval_rc else "wrote no summary"
        print(f"eval             {why}; rerun: jedi-eval {' '.join(eval_cmd[3:])}")
    print(f"personalize      jedi-sample {run_dir}/pipeline --ref PHOTOS_DIR --prompt 'a toy on the beach' "
          "--num 4 --guidance 3 --image-guidance 3 --out OUT_DIR   (the demo's eval settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""jedi-train / jedi-export through their console scripts, as a user runs them (issue 5's acceptance).

One small demo configuration (procedural sets synthesized on first use, tiny pixel model, 2 loader
workers, W&B offline) trained three ways: uninterrupted to 2k steps, and stopped at k then resumed
to 2k in another run dir. The resumed run must see the same sets and reach the same losses.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from pathlib import Path

import pytest
import torch
from helpers.cli import FAST, losses, run_jedi
from helpers.wandb_reader import read_run

K = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jedi_root")
    full, resumed = root / "full", root / "resumed"
    run_jedi("jedi-train", *FAST, f"trainer.max_steps={2 * K}", f"paths.output_dir={full}", "log_checkpoint_artifact=true",
             root=root)
    first = run_jedi("jedi-train", *FAST, f"trainer.max_steps={K}", f"paths.output_dir={resumed}", root=root)
    at_k = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    second = run_jedi("jedi-train", *FAST, f"trainer.max_steps={2 * K}", f"paths.output_dir={resumed}", root=root)
    return {"root": root, "full": full, "resumed": resumed, "at_k": at_k, "first": first, "second": second}


def test_demo_synthesizes_its_data_once_and_writes_a_run_dir(runs):
    root, run = runs["root"], runs["resumed"]
    assert len(glob.glob(str(root / "data" / "sets" / "procedural_centered" / "*.tar"))) > 0
    assert len(glob.glob(str(root / "data" / "sets" / "procedural_centered_heldout" / "*.tar"))) > 0
    assert "synthesizing" not in runs["second"].stderr + runs["second"].stdout  # cached data reused
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "config.yaml").is_file()
    assert f"paths.output_dir={run}" in (run / ".hydra" / "overrides.yaml").read_text()
    assert sorted(glob.glob(str(run / "samples" / "samples_step*.png")))  # sample grids as PNG
    assert (run / "loss_curve.png").is_file()
    with open(run / "samples" / "identity_gain.csv") as f:  # masks travelled from the shards to the metric
        rows = list(csv.DictReader(f))
    assert rows[-1]["step"] == str(2 * K) and float(rows[-1]["identity_gain_se"]) > 0


def test_second_command_resumes_at_k_and_stops_at_2k(runs):
    assert runs["at_k"] == K
    ckpt = torch.load(runs["resumed"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 * K
    assert "ema" in ckpt and "optimizer_states" in ckpt and "lr_schedulers" in ckpt
    assert ckpt["JeDiDataModule"]["ranks"]  # the data loader's position travels with the checkpoint
    assert f"run dir: {runs['resumed']} (step {2 * K})" in runs["second"].stdout


def test_resumed_run_sees_the_same_sets_and_losses_as_an_uninterrupted_one(runs):
    full, resumed = losses(runs["full"]), losses(runs["resumed"])
    assert [s for s, _, _ in full] == list(range(1, 2 * K + 1))
    assert [(s, sets) for s, _, sets in resumed] == [(s, sets) for s, _, sets in full]
    for (s, a, _), (_, b, _) in zip(full, resumed):
        assert abs(a - b) <= 1e-6, f"step {s}: {a} vs {b}"
    assert len({sets for _, _, sets in full}) == 2 * K  # every step drew other sets


def test_wandb_offline_run_is_continued_and_readable(runs):
    run = runs["resumed"]
    run_id = (run / "wandb_id.txt").read_text().strip()
    files = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)  # same run, twice
    first, second = read_run(files[0]), read_run(files[1])
    assert first["run_id"] == second["run_id"] == run_id
    steps = [r["trainer/global_step"] for r in first["history"] + second["history"] if "train/loss" in r]
    assert steps and max(steps) >= 2 * K - 1 and min(steps) < K
    assert any(k.startswith("model") for k in first["config"])
    assert first["config"].get("seed") == 0 or "seed" in str(first["config"])
    images = glob.glob(str(run / "wandb" / "offline-run-*" / "files" / "media" / "images" / "*.png"))
    assert images, "sample grids were not logged to W&B"


def test_each_export_is_a_wandb_model_artifact_with_aliases(runs):
    run = runs["resumed"]
    run_id = (run / "wandb_id.txt").read_text().strip()
    files = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb")))
    arts = [a for f in files for a in read_run(f)["artifacts"]]
    assert [a["name"] for a in arts] == [f"pipeline-{run_id}"] * 2  # one per export: the run and its resume
    assert all(a["type"] == "model" for a in arts)
    assert [a["metadata"]["step"] for a in arts] == [K, 2 * K]
    # (W&B gives every new version "latest" itself; the record keeps the other aliases)
    assert {f"step-{K}", "best"} <= set(arts[0]["aliases"]) and f"step-{2 * K}" in arts[1]["aliases"]
    assert "model_index.json" in arts[1]["files"] and "unet/diffusion_pytorch_model.safetensors" in arts[1]["files"]
    assert "README.md" in arts[1]["files"] and "pipeline_jedi.py" in arts[1]["files"]
    # log_checkpoint_artifact=true (the uninterrupted run): the last checkpoint is an artifact too
    full = [a for f in glob.glob(str(runs["full"] / "wandb" / "offline-run-*" / "run-*.wandb"))
            for a in read_run(f)["artifacts"]]
    ckpts = [a for a in full if a["name"].startswith("checkpoint-")]
    assert len(ckpts) == 1 and ckpts[0]["files"] == ["last.ckpt"] and ckpts[0]["metadata"]["step"] == 2 * K
    assert not any(a["name"].startswith("checkpoint-") for a in arts)  # off by default
    best = json.loads((run / "artifacts.json").read_text())
    # "best" moves to the second export only if its train/loss is lower than the first's
    assert ("best" in arts[1]["aliases"]) == (best["step"] == 2 * K)
    assert best["metric"] == "train/loss" and best["best"] == arts[best["step"] // K - 1]["metadata"]["value"]


def check_model_card(out: Path, step: int, run_id: str):
    import yaml

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])  # the metadata block the Hub reads
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert "jedi" in front["tags"] and "base_model" not in front  # trained from a local tiny model
    assert "JointUNet2DConditionModel" in card and "pixel space (pixels folded 4x4)" in card
    assert f"| steps | {step} |" in card and run_id in card and "procedural_centered" in card
    assert "trust_remote_code=True" in card and "image_guidance_scale" in card
    assert "![samples](samples.png)" in card and (out / "samples.png").is_file()


def test_export_writes_a_pipeline_that_reproduces_the_checkpoint(runs, tmp_path):
    from jedi_train.models.attention import SetLayout
    from jedi_train.pipelines.auto import JeDiAutoPipeline
    from jedi_train.training.module import JeDiModule

    ckpt = runs["resumed"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "pipe"
    p = run_jedi("jedi-export", str(ckpt), str(out), root=runs["root"])
    assert str(out) in p.stdout
    assert (out / "model_index.json").is_file()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not glob.glob(str(tmp_path / "*tmp*"))  # the temp dir was renamed, not left behind
    check_model_card(out, step=2 * K, run_id=(runs["resumed"] / "wandb_id.txt").read_text().strip())
    pipe = JeDiAutoPipeline.from_pretrained(out)
    assert pipe.reference_cache_supported()  # the demo trains references->references attention at t=0
    module = JeDiModule.load_from_checkpoint(str(ckpt), map_location="cpu")
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    x = torch.randn(3, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    t = torch.tensor([0, 500, 500])
    text = pipe.encode_text(["a mug", "a mug in the snow", "a mug at night"])
    layout = SetLayout.build(torch.tensor([[True, False, False]]))
    with module.ema_weights() as trained:
        want = trained(x, t, text, set_layout=layout).sample
    got = unet(x, t, text, set_layout=layout).sample
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(AssertionError):  # the raw (non-EMA) weights differ: EMA was really exported
        assert torch.allclose(got, module.denoiser(x, t, text, set_layout=layout).sample, atol=1e-5)


def test_bad_inputs_fail_with_one_line(tmp_path):
    p = run_jedi("jedi-train", "experiment=demo", "model=sd15", f"model.model_dir={tmp_path}/nowhere",
                 f"paths.output_dir={tmp_path}/run", root=tmp_path, check=False)
    assert p.returncode == 2 and "nowhere" in p.stderr and "Traceback" not in p.stderr
    p = run_jedi("jedi-train", "experiment=demo", f"ckpt_path={tmp_path}/missing.ckpt",
                 f"paths.output_dir={tmp_path}/run", root=tmp_path, check=False)
    assert p.returncode == 2 and "missing.ckpt" in p.stderr
    p = run_jedi("jedi-train", "experiment=demo", "data.sources=[{url: /nowhere/*.tar}]", "data.synthesize_if_missing=null",
                 "model.create_tiny_if_missing.resolution=32", f"paths.output_dir={tmp_path}/run", "logger=none",
                 root=tmp_path, check=False)
    assert p.returncode == 2 and "/nowhere/*.tar" in p.stderr and "Traceback" not in p.stderr
    p = run_jedi("jedi-train", "experiment=demo", "model.learning_rat=1", root=tmp_path, check=False)
    assert p.returncode == 2 and "learning_rat" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_jedi("jedi-export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out"), root=tmp_path, check=False)
    assert p.returncode == 2 and "missing.ckpt" in p.stderr and not (tmp_path / "out").exists()


def test_export_refuses_a_checkpoint_from_another_model(runs, tmp_path):
    from jedi_train.models.tiny import create_tiny_model_dir

    other = create_tiny_model_dir(str(tmp_path / "other"), unet_kwargs={"block_out_channels": (16, 32)})
    ckpt = runs["resumed"] / "checkpoints" / "last.ckpt"
    p = run_jedi("jedi-export", str(ckpt), str(tmp_path / "out"), "--model-dir", other, root=runs["root"], check=False)
    assert p.returncode == 2 and "another model" in p.stderr and "last.ckpt" in p.stderr
    assert not (tmp_path / "out").exists()


def test_optuna_sweep_runs_trials_in_their_own_dirs(tmp_path):
    """hparams_search=optuna end to end (2 tiny trials): each trial trains in its own sweep subdir and
    Optuna records the best value of the metric the trials returned."""
    import yaml

    sweep = tmp_path / "sweep"
    p = run_jedi("jedi-train", "-m", "hparams_search=optuna", "experiment=demo", "debug=fast", "~callbacks.sample_grid",
                 "data.synthesize_if_missing.num_sets=32", "data.heldout_synthesize_if_missing.num_sets=2",
                 "data.batch_size=2", "trainer.max_steps=2", "export_after_fit=false", "hydra.sweeper.n_trials=2",
                 f"hydra.sweep.dir={sweep}", root=tmp_path)
    trials = sorted(d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit())
    assert [d.name for d in trials] == ["0", "1"], p.stdout[-2000:]
    lrs = set()
    for d in trials:
        assert (d / "checkpoints" / "last.ckpt").is_file()
        lrs.add(yaml.safe_load((d / "config.yaml").read_text())["model"]["optimizer"]["lr"])
    assert len(lrs) == 2  # the sampler proposed different learning rates
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and isinstance(best["best_value"], float)


def test_demo_summary_points_at_the_run_outputs(runs, monkeypatch, capsys):
    """`make train`'s closing summary, over a real run dir (the training subprocess itself is stubbed:
    the demo's training is the jedi-train command tested above)."""
    from jedi_train.cli import demo

    calls = []

    def fake_call(cmd):  # the eval step "writes" its summary, as jedi-eval does
        calls.append(cmd)
        if "procedural" in cmd:
            out_dir = cmd[cmd.index("--out") + 1]
            os.makedirs(out_dir, exist_ok=True)
            row = {"refs": 1, "image_guidance": 1.0, "gap_closed": 0.123, "gap_closed_ci": [0.05, 0.2],
                   "nearest_subject_acc": 0.25, "scene_acc": 0.5, "sharpness": 0.61, "sharpness_ci": [0.5, 0.7],
                   "details": {"pattern": {"gap_closed": 0.4, "gap_closed_ci": [0.2, 0.6], "acc": 0.42,
                                           "ceiling": 0.8, "chance": 1 / 7}}}
            with open(os.path.join(out_dir, "summary.json"), "w") as f:
                json.dump({"rows": [row]}, f)
        return 0

    monkeypatch.setattr(demo.subprocess, "call", fake_call)
    assert demo.main([f"paths.output_dir={runs['resumed']}"]) == 0
    out = capsys.readouterr().out
    assert "experiment=demo" in calls[0]
    assert calls[1][3:5] == ["procedural", f"{runs['resumed']}/pipeline"] and "--out" in calls[1]
    assert "refs 1 (image guidance 1): gap closed +12.3% (95% CI +5.0 .. +20.0)" in out
    assert ("details          refs 1 (image guidance 1): detail gap closed pattern +40% (+20 .. +60; acc 0.42, "
            "ceiling 0.80, chance 0.14); sharpness 0.61 (0.50 .. 0.70)") in out
    grids = sorted(glob.glob(str(runs["resumed"] / "samples" / "samples_step*.png")))
    assert f"sample grid      {grids[-1]}" in out
    values = [v for _, v, _ in losses(runs["resumed"])]
    half = len(values) // 2  # the summary averages min(50, steps // 2) steps at each end
    assert f"first {half} steps {sum(values[:half]) / half:.4f} -> last {half} steps " \
           f"{sum(values[-half:]) / half:.4f} (steps 1..{2 * K})" in out
    assert "identity gain" in out and f"jedi-sample {runs['resumed']}/pipeline" in out
    calls.clear()  # a named experiment replaces the proof's; the proof's full eval table stays
    assert demo.main(["--proof", "experiment=proof_gpu", f"paths.output_dir={runs['resumed']}"]) == 0
    assert "experiment=proof_gpu" in calls[0] and "experiment=proof" not in calls[0]
    assert calls[1][calls[1].index("--subjects") + 1] == "64"


def test_push_to_hub_offline_fails_in_one_line_after_a_complete_local_export(runs, tmp_path, monkeypatch):
    # no network here: the upload itself is not testable beyond this line (huggingface_hub's upload_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "pipe"
    p = run_jedi("jedi-export", str(runs["resumed"] / "checkpoints" / "last.ckpt"), str(out),
                 "--push-to-hub", "someone/jedi-demo", root=runs["root"], check=False)
    assert p.returncode == 3
    errors = [line for line in p.stderr.splitlines() if "jedi-export: error" in line]
    assert len(errors) == 1 and "Hub" in errors[0] and str(out) in errors[0] and "Traceback" not in p.stderr
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()


def test_jedi_eval_puts_its_table_into_the_model_card(runs, tmp_path):
    out = tmp_path / "pipe"
    run_jedi("jedi-export", str(runs["resumed"] / "checkpoints" / "last.ckpt"), str(out), root=runs["root"])
    run_jedi("jedi-eval", "procedural", str(out), "--out", str(tmp_path / "eval"), "--subjects", "2", "--refs", "0,1",
             "--image-guidance", "1", "--samples", "1", "--steps", "2", "--layout", "centered", root=runs["root"])
    card = (out / "README.md").read_text()
    assert card.count("<!-- jedi-eval:begin -->") == 1 and "| refs | image guidance |" in card
    run_jedi("jedi-eval", "procedural", str(out), "--out", str(tmp_path / "eval2"), "--subjects", "2", "--refs", "0",
             "--samples", "1", "--steps", "2", "--layout", "centered", root=runs["root"])
    card = (out / "README.md").read_text()
    assert card.count("<!-- jedi-eval:begin -->") == 1  # replaced, not appended
    assert "| 1 | 1 |" not in card.split("<!-- jedi-eval:begin -->")[1]


def test_jedi_eval_logs_its_table_to_the_training_run(runs, tmp_path):
    import shutil

    run = tmp_path / "run"  # a copy: the other tests count the original run's W&B files
    shutil.copytree(runs["resumed"] / "pipeline", run / "pipeline")
    for name in ("wandb_id.txt", "config.yaml"):
        shutil.copy(runs["resumed"] / name, run / name)
    p = run_jedi("jedi-eval", "procedural", str(run / "pipeline"), "--out", str(tmp_path / "eval"), "--subjects", "2",
                 "--refs", "0,1", "--image-guidance", "1", "--samples", "1", "--steps", "2", "--grids", "2",
                 root=runs["root"])
    run_id = (run / "wandb_id.txt").read_text().strip()
    assert f"logged to the training run {run_id}" in p.stdout
    files = glob.glob(str(run / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    assert len(files) == 1
    logged = read_run(files[0])
    assert logged["run_id"] == run_id
    row = next(r for r in logged["history"] if "eval_procedural/table/_type" in r)
    assert row["eval_procedural/table/_type"] == "table-file" and row["eval_procedural/table/nrows"] == 2
    assert row["eval_procedural/grids/count"] == 2  # --grids 2
    assert "eval_procedural/refs1_ig1.0/gap_closed" in logged["summary"]

"""Bad input to the console scripts: exit 2 and one line naming the key, no traceback (issue 12).
jedi-train's checks come before the model, the data or W&B: the run dir gets no config.yaml."""
import json
import os

import numpy as np
import pytest
from helpers.cli import cli, compose_train, one_line_error
from helpers.images import bomb_png
from PIL import Image


def text_file(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    return tmp_path / "notes.ckpt"


@pytest.mark.parametrize("override,keys,absent", [
    ("trainer.max_steps=abc", ["trainer.max_steps", "whole number"], []),
    ("data.batch_size=0", ["data.batch_size=0", "data.batch_size=1 or more"], []),
    ("data.batch_size=-3", ["data.batch_size=-3", "data.batch_size=1 or more"], ["lower"]),
    ("model.resolution=30", ["model.resolution=30", "multiple of 8", "model.resolution=32"], []),
    ("data.resolution=36", ["data.resolution=36", "model.resolution=32"], []),
    ("ckpt_path={notes}", ["ckpt_path", "notes.ckpt", "not a checkpoint"], []),
])
def test_jedi_train_refuses_bad_values_before_building_anything(tmp_path, override, keys, absent):
    run = tmp_path / "run"
    p = cli("jedi-train", override.format(notes=text_file(tmp_path)), f"paths.output_dir={run}", "logger=none",
            cwd=tmp_path)
    line = one_line_error(p, "jedi-train")
    for k in keys:
        assert k in line, line
    for k in absent:
        assert k not in line, line
    assert not (run / "config.yaml").exists()  # train() never started: no model, data or logger


def test_stream_names_the_batch_size_key(tmp_path):
    from helpers.stream_helpers import write_shards

    from data_pipelines.stream import SetStream, StreamConfig

    write_shards(str(tmp_path), num_shards=1, sets_per_shard=2)
    with pytest.raises(ValueError, match=r"data.batch_size=-1 must be >= 1") as e:
        SetStream(StreamConfig(sources=str(tmp_path / "*.tar"), batch_size=-1))
    assert "lower" not in str(e.value)


def test_jedi_data_pipe_hint_names_its_flag(tmp_path):
    line = one_line_error(cli("jedi-data", "stats", "pipe:cat x.tar", cwd=tmp_path), "jedi-data")
    assert "--allow-pipe" in line and "data.allow_pipe" not in line


def test_jedi_sample_decompression_bomb_is_one_line(pipe_dir, tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png", 15000, 15000)
    p = cli("jedi-sample", pipe_dir, "--ref", bomb, "--prompt", "a can", "--num", 1, "--steps", 1,
            "--out", tmp_path / "out", cwd=tmp_path)
    line = one_line_error(p, "jedi-sample")
    assert "bomb.png" in line and "too many pixels" in line and not (tmp_path / "out").exists()


def test_jedi_sample_seed_defaults_to_0_and_tiny_reference_warns(pipe_dir, tmp_path):
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tmp_path / "dot.png")
    out = tmp_path / "out"
    p = cli("jedi-sample", pipe_dir, "--ref", tmp_path / "dot.png", "--prompt", "a can", "--num", 1, "--steps", 1,
            "--out", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("jedi-sample: warning:")]
    assert len(warnings) == 1 and "dot.png is only 1x1 pixels" in warnings[0]
    assert "(seed 0)" in p.stdout
    with open(out / "settings.json") as f:
        assert json.load(f)["seed"] == 0


@pytest.mark.parametrize("overrides", [[], ["experiment=demo"], ["experiment=proof"], ["experiment=sd15_s3"],
                                       ["model=sd15", "trainer=gpu"], ["model=sd21", "debug=fast"]])
def test_shipped_configs_pass_the_checks(tmp_path, overrides):
    from jedi_train.training.config_checks import check_config

    check_config(compose_train(overrides, tmp_path))


def test_a_data_url_matching_nothing_is_refused_without_running_the_demo_synthesizer(tmp_path):
    # the synthesizer must not run for a path outside its out_dir, since its shards could never make the user's
    # pattern match; and (issue 35) the sources are checked before the model is built or the run dir made
    p = cli("jedi-train", "experiment=demo", "logger=none", f"paths.output_dir={tmp_path / 'run'}",
            f"data.sources=[{{url: {tmp_path}/mine/*.tar, weight: 1.0}}]", "trainer.max_steps=1", cwd=tmp_path)
    line = one_line_error(p, "jedi-train")
    assert "matches no shards" in line and "mine/*.tar" in line and "synthesis on first use" in line, line
    assert not (tmp_path / "data" / "sets" / "procedural_centered").exists()  # no synthesis happened
    assert "created the embedded tiny random-init model" not in p.stdout + p.stderr  # refused before the model
    assert not (tmp_path / "run").exists()


def test_missing_shards_and_references_are_named_for_what_they_are(tmp_path, pipe_dir):
    from data_pipelines.shards import read_tar
    from data_pipelines.skips import Counts

    loop = tmp_path / "loop.tar"
    loop.symlink_to(loop)
    counts = Counts(log_every_s=float("inf"))
    for url in (str(tmp_path / "gone.tar"), str(loop)):
        assert list(read_tar(url, counts)) == []
    assert counts.skipped == {"not_found": 1, "symlink_loop": 1}, counts.skipped
    ref = tmp_path / "loop.png"
    ref.symlink_to(ref)
    line = one_line_error(cli("jedi-sample", pipe_dir, "--ref", ref, "--prompt", "a toy", "--num", "1", "--out", tmp_path / "o",
                              cwd=tmp_path), "jedi-sample")
    assert "symlink loop" in line and "does not exist" not in line, line


def test_the_pipeline_api_refuses_a_decompression_bomb_reference_in_one_clear_error(tmp_path):
    from jedi_train.pipelines.references import load_references

    with pytest.raises(ValueError, match=r"too many pixels .* decompression bomb.*smaller photo") as e:
        load_references([str(bomb_png(tmp_path / "bomb.png", 15000, 15000))], 32)
    assert "\n" not in str(e.value)


def test_pickled_bin_weights_are_refused_in_one_line_naming_the_file_and_the_conversion(tmp_path):
    """A plain tensor .bin loads; one holding Python objects is refused by the safe loader, with the fix."""
    import argparse

    import torch
    from diffusers import UNet2DConditionModel

    from jedi_train.models.components import load_components
    from jedi_train.models.tiny import create_tiny_model_dir

    d = create_tiny_model_dir(str(tmp_path / "m"))
    state = UNet2DConditionModel.from_pretrained(d, subfolder="unet").state_dict()
    os.remove(f"{d}/unet/diffusion_pytorch_model.safetensors")
    torch.save(state, f"{d}/unet/diffusion_pytorch_model.bin")
    assert load_components(d).denoiser is not None  # tensors only: fine
    torch.save({**state, "args": argparse.Namespace(lr=1)}, f"{d}/unet/diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.bin holds Python objects.*safe_serialization=True"):
        load_components(d)
    run = tmp_path / "run"
    line = one_line_error(cli("jedi-train", "logger=none", f"model.model_dir={d}", "model.create_tiny_if_missing=null",
                              f"paths.output_dir={run}", cwd=tmp_path), "jedi-train")
    assert "holds Python objects" in line, line

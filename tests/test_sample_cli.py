"""jedi-sample end to end in a subprocess, on a tiny pipeline exported to disk."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
from helpers import zygote
from PIL import Image

DREAMBENCH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "dreambench")
SCRIPT = os.path.join(os.path.dirname(sys.executable), "jedi-sample")
CMD = [SCRIPT] if os.path.isfile(SCRIPT) else [sys.executable, "-m", "jedi_train.cli.sample"]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """A DreamBench subject folder when available (else a folder of made-up photos) and one odd file."""
    d = tmp_path_factory.mktemp("refs")
    folder = os.path.join(DREAMBENCH, "can")
    if not os.path.isdir(folder):
        folder = str(d / "subject")
        os.makedirs(folder)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (60, 80, 3), np.uint8)).save(f"{folder}/{i}.jpg")
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[..., 0] = rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "cutout.png")
    return folder, str(d / "cutout.png")


def sample(*args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # 1 thread: faster on a shared 2-core box
    proc = zygote.run(CMD + [str(a) for a in args], env=env, cwd=os.getcwd(), timeout=300)  # a process of its own
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_json(path):
    with open(path) as f:
        return json.load(f)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_writes_outputs_grid_settings(pipe_dir, refs, tmp_path):
    folder, cutout = refs
    k = len([f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".png"))]) + 1
    out = tmp_path / "run"
    common = [pipe_dir, "--ref", folder, "--ref", cutout, "--prompt", "a can", "--prompt", "a can on the moon",
              "--num", 2, "--seed", 3, "--steps", 2, "--guidance", 3, "--image-guidance", 2, "--scheduler", "dpm"]
    proc = sample(*common, "--out", out)
    assert str(out) in proc.stdout
    names = sorted(os.listdir(out))
    assert names == ["00_00.png", "00_01.png", "01_00.png", "01_01.png", "grid.png", "references", "settings.json"]
    for n in names[:4]:
        assert Image.open(out / n).size == (32, 32)
    assert len(os.listdir(out / "references")) == k
    assert pixels(out / "references" / f"{k - 1:02d}.png").tolist() == [[[255, 0, 0]] * 32] * 32  # RGBA on white
    grid = Image.open(out / "grid.png")
    assert grid.height > 3 * 128 and grid.width >= k * 128  # references row + one row per prompt
    s = read_json(out / "settings.json")
    assert s["prompts"] == ["a can", "a can on the moon"] and len(s["references"]) == k
    assert (s["seed"], s["steps"], s["num_images_per_prompt"]) == (3, 2, 2)
    assert (s["guidance_scale"], s["image_guidance_scale"]) == (3.0, 2.0)
    assert s["scheduler"] == "DPMSolverMultistepScheduler"
    assert s["scheduler_config"]["algorithm_type"] == "dpmsolver++" and s["reference_cache"] is True
    assert [o["file"] for o in s["outputs"]] == names[:4] and s["outputs"][2]["prompt"] == "a can on the moon"
    assert os.listdir(tmp_path) == ["run"]  # no temp dir left behind

    again = sample(*common, "--out", tmp_path / "again", "--no-cache", "--explain")  # same seed, no KV cache
    s2 = read_json(tmp_path / "again" / "settings.json")
    assert s2["reference_cache"] is False and again.returncode == 0 and s2["explain"] is True
    # --explain: per image one overlay per reference beside it, its attention shares in settings.json
    overlays = sorted(n for n in os.listdir(tmp_path / "again") if ".attention." in n)
    assert overlays == sorted(f"{n[:-4]}.attention.{j}.png" for n in names[:4] for j in range(k))
    for o in s2["outputs"]:
        a = o["attention"]
        assert sum(a["reference_shares"]) + a["self_share"] + a["others_share"] == pytest.approx(1, abs=1e-3)
    for n in names[:4]:  # the cache changes nothing but rounding
        assert np.abs(pixels(out / n) - pixels(tmp_path / "again" / n)).max() <= 1

    sample(*common[:-4], "--image-guidance", 0, "--out", out, "--overwrite", "--seed", 4)  # pipeline's DDIM
    s3 = read_json(out / "settings.json")
    assert s3["scheduler"] == "DDIMScheduler" and s3["seed"] == 4 and s3["reference_cache"] is False
    assert any(np.abs(pixels(out / n) - pixels(tmp_path / "again" / n)).max() > 0 for n in names[:4])
    assert sorted(os.listdir(tmp_path)) == ["again", "run"]


def bad(pipe_dir, tmp_path, *args, **kw):
    out = tmp_path / "out"
    base = {"--prompt": "a can", "--num": 1, "--seed": 0, "--out": out, "--steps": 1, **kw}
    argv = [pipe_dir, *args] + [x for k, v in base.items() if v is not None for x in (k, v)]
    proc = sample(*argv, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("jedi-sample: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    return lines[0]


def test_bad_reference_paths(pipe_dir, refs, tmp_path):
    assert "--ref /nope/cat.jpg does not exist" in bad(pipe_dir, tmp_path, "--ref", "/nope/cat.jpg")
    (tmp_path / "notes.jpg").write_text("hello")
    line = bad(pipe_dir, tmp_path, "--ref", tmp_path / "notes.jpg")
    assert "notes.jpg is not a readable image" in line and "JPEG/PNG" in line
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in bad(pipe_dir, tmp_path, "--ref", tmp_path / "empty")


def test_missing_refs_prompts_and_flags(pipe_dir, refs, tmp_path):
    ref = refs[1]
    line = bad(pipe_dir, tmp_path)
    assert "no --ref given" in line and "--image-guidance 0" in line
    assert "no --prompt given" in bad(pipe_dir, tmp_path, "--ref", ref, **{"--prompt": None})
    assert "--num 0 is too small" in bad(pipe_dir, tmp_path, "--ref", ref, **{"--num": 0})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier results")
    proc = sample(pipe_dir, "--ref", ref, "--prompt", "a", "--num", 1, "--seed", 0, "--out", tmp_path / "out",
                  check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert os.listdir(tmp_path / "out") == ["keep.txt"]  # refused, and left as it was
    proc = sample(pipe_dir, "--ref", ref, "--prompt", "a", "--num", 1, "--seed", 0, "--out", tmp_path / "out",
                  "--overwrite", check=False)  # not a jedi-sample output: --overwrite does not replace it either
    assert proc.returncode == 2 and "not a previous jedi-sample output" in proc.stderr
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_bad_pipeline_dirs(pipe_dir, tiny_model_dir, refs, tmp_path):
    ref = refs[1]
    line = bad(str(tmp_path / "nowhere"), tmp_path, "--ref", ref)
    assert "does not exist" in line and "jedi-export" in line
    line = bad(tiny_model_dir, tmp_path, "--ref", ref)  # a model dir, not a pipeline
    assert "no model_index.json" in line and "jedi-export" in line
    plain = shutil.copytree(pipe_dir, tmp_path / "plain")
    shutil.rmtree(plain / "unet")
    shutil.copytree(os.path.join(tiny_model_dir, "unet"), plain / "unet")
    assert "not a joint UNet" in bad(str(plain), tmp_path, "--ref", ref)

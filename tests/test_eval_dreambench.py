"""jedi-eval dreambench: prompts, metrics on fixed vectors, tiny random extractors loaded from disk the way a
user's real directories are, one end-to-end CLI run on two real DreamBench subjects, and bad input."""
import csv
import functools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jedi_train.eval import dreambench as db
from jedi_train.eval import extractors
from jedi_train.eval.common import EvalError

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "dreambench"
needs_dreambench = pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="../shared/dreambench not present")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cli(eval_cli):
    return functools.partial(eval_cli, "dreambench")


# -- pieces --------------------------------------------------------------------------------------------
def test_cosines_by_hand():
    gen = np.array([[1.0, 0.0], [0.0, 3.0]])  # the second is not unit length: cosines normalise
    real = np.array([[2.0, 0.0], [1.0, 1.0]])
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(db.mean_cosine(gen, real), [(1 + r) / 2, (0 + r) / 2])
    np.testing.assert_allclose(db.mean_cosine(gen[0], real[:1]), [1.0])
    np.testing.assert_allclose(db.paired_cosine(gen, real), [1.0, r])
    three = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(db.real_vs_real(three), [(0 + r) / 2, (0 + r) / 2, r])
    assert np.isnan(db.real_vs_real(three[:1])).all()
    np.testing.assert_allclose(db.real_vs_real(three[:2], np.array([[1.0, 1.0], [2.0, 0.0]])), [1.0, r])


def test_prompts_and_references(fake_bench):
    assert db.fill_prompt("a {0} {1} in the snow", "stuffed animal") == "a stuffed animal in the snow"
    assert db.fill_prompt("a red {0} {1}", "dog") == "a red dog"
    b = db.load_bench(fake_bench)
    assert b.present() == ["box", "pup"] and b.classes["absent"] == "toy"
    assert b.prompts("pup") == ["a dog wearing a hat", "a dog in the snow", "a dog on the beach"]
    assert b.prompts("box")[0] == "a box on a table"
    photos = [f"{i:02d}.jpg" for i in range(6)]
    three = db.choose_references(photos, 3, 0, "can")
    assert three == db.choose_references(photos, 3, 0, "can") and len(set(three)) == 3
    assert set(db.choose_references(photos, 1, 0, "can")) <= set(three)  # nested
    assert len({tuple(db.choose_references(photos, 3, s, "can")) for s in range(8)}) > 1
    assert db.generation_seed(0, "can", 1, 0) == db.generation_seed(0, "can", 1, 0) != db.generation_seed(0, "can", 3, 0)


@needs_dreambench
def test_dreambench_prompts():
    b = db.load_bench(str(DREAMBENCH))
    assert len(b.classes) == 30 and len(b.present()) == 10
    live = [s for s in b.classes if b.is_live(s)]
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]  # DreamBench's 9 pets
    for s in b.present():
        prompts = b.prompts(s)
        assert len(prompts) == 25 == len(set(prompts))
        assert all("{" not in p and "  " not in p and "sks" not in p and b.classes[s] in p for p in prompts)
    assert "a dog wearing a red hat" in b.prompts("dog2") and "a cat in a chef outfit" in b.prompts("cat2")
    assert "a backpack floating on top of water" in b.prompts("backpack")
    assert not any("hat" in p for p in b.prompts("backpack"))
    assert b.prompts("wolf_plushie")[-1] == "a cube shaped stuffed animal"


def test_extractors_from_saved_dirs(extractor_dirs, tmp_path):
    dino_dir, clip_dir = extractor_dirs
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (48, 40, 3), np.uint8)) for _ in range(3)]
    dino = extractors.load_dino(dino_dir)
    e = dino.embed_images(imgs + imgs[:1])
    assert e.shape == (4, 32) and np.allclose(np.linalg.norm(e, axis=1), 1)
    assert db.mean_cosine(e[3], e[:1])[0] == pytest.approx(1.0)  # same image, same embedding
    clip = extractors.load_clip(clip_dir)
    assert clip.embed_images(imgs).shape == (3, 16)
    t = clip.embed_texts(["a dog in the snow", "a red backpack"])
    assert t.shape == (2, 16) and np.allclose(np.linalg.norm(t, axis=1), 1)

    bare = tmp_path / "bare"  # no preprocessor_config.json: the documented default transform
    bare.mkdir()
    for f in os.listdir(dino_dir):
        if f != "preprocessor_config.json":
            os.symlink(os.path.join(dino_dir, f), bare / f)
    assert extractors.load_dino(str(bare)).embed_images(imgs).shape == (3, 32)


def test_open_clip_spec(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "jedi-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "jedi-test-tiny-clip.json"))
    torch.save(open_clip.create_model("jedi-test-tiny-clip").state_dict(), tmp_path / "w.pt")
    clip = extractors.load_clip(f"jedi-test-tiny-clip:{tmp_path / 'w.pt'}")
    assert clip.embed_images([Image.new("RGB", (50, 40), (9, 99, 199))]).shape == (1, 16)
    assert clip.embed_texts(["a can"]).shape == (1, 16)
    with pytest.raises(EvalError, match="does not exist"):
        extractors.check_clip(f"jedi-test-tiny-clip:{tmp_path / 'none.pt'}")
    with pytest.raises(EvalError, match="not an open_clip architecture"):
        extractors.check_clip(f"NoSuchNet:{tmp_path / 'w.pt'}")


# -- end to end ------------------------------------------------------------------------------------------
def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@needs_dreambench
def test_cli_end_to_end_and_resume(cli, pipe_dir, extractor_dirs, tmp_path, monkeypatch):
    from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

    masks = tmp_path / "masks" / "backpack"  # masks for one subject only: MDINO there, empty for dog2
    masks.mkdir(parents=True)
    for p in sorted((DREAMBENCH / "backpack").glob("*.jpg")):
        m = np.zeros((64, 64), np.uint8)
        m[16:48, 16:48] = 255
        Image.fromarray(m).save(masks / f"{p.stem}.png")
    calls = []
    real_call = JeDiPipeline.__call__
    monkeypatch.setattr(JeDiPipeline, "__call__", lambda self, *a, **k: calls.append(k) or real_call(self, *a, **k))
    out = tmp_path / "out"
    opts = {"--bench": DREAMBENCH, "--subjects": "dog2,backpack", "--refs": 1, "--samples": 1, "--steps": 2,
            "--prompts-per-subject": 2, "--out": out, "--dino": extractor_dirs[0], "--clip": extractor_dirs[1],
            "--masks": tmp_path / "masks", "--device": "cpu"}

    def argv(**kw):
        return [pipe_dir, "--real", *[x for k, v in {**opts, **kw}.items() for x in (k, v)]]

    args = argv()
    rc, stdout, stderr = cli(*args)
    assert rc == 0, stderr[-3000:]
    # both subjects in one call (--batch 4), each with its own prompts and references
    assert len(calls) == 1 and calls[0]["prompt"][0] == ["a dog in the jungle", "a dog in the snow"]
    assert len(calls[0]["prompt"]) == 2 and len(calls[0]["reference_images"]) == 2
    rows = read_rows(out / "per_image.csv")
    assert len(rows) == 2 * 2 * 1 * 1  # subjects x prompts x samples x refs values
    assert {"subject", "prompt", "refs", "sample", "image", "dino", "clip_i", "clip_t", "mdino"} <= set(rows[0])
    for r in rows:
        assert all(-1 <= float(r[m]) <= 1 for m in ("dino", "clip_i", "clip_t"))
        assert (r["mdino"] == "") == (r["subject"] == "dog2")
        assert Image.open(out / r["image"]).size == (32, 32)
    s = json.loads((out / "summary.json").read_text())
    assert [r["refs"] for r in s["rows"]] == [1] and s["rows"][0]["n_images"] == 4
    for m in ("dino", "clip_i", "clip_t", "mdino"):
        lo, hi = s["rows"][0][f"{m}_ci"]
        assert -1 <= lo <= s["rows"][0][m] <= hi <= 1
    assert len(s["per_subject"]) == 2 and s["real"]["dino"] is not None and s["real"]["n_photos"] == 12
    assert len(s["settings"]["references"]["dog2"]["1"]) == 1
    assert s["pipeline"]["resolution"] == 32
    md = (out / "summary.md").read_text()
    assert "0.668" in md and "NOT comparable" in md and "real photos" in md
    assert sorted(os.listdir(out / "grids")) == ["backpack.png", "dog2.png"]
    stamps = {p: os.stat(p).st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert len(stamps) == 4

    calls.clear()  # same settings: every image reused, scores recomputed
    rc, stdout, stderr = cli(*args)
    assert rc == 0 and not calls and "0 images generated, 4 reused" in stdout, stderr[-3000:]
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps and read_rows(out / "per_image.csv") == rows

    calls.clear()  # one subject per call: the same images
    rc, _, stderr = cli(*argv(**{"--batch": 1, "--out": tmp_path / "one"}))
    assert rc == 0 and len(calls) == 2, stderr[-3000:]
    for p in stamps:
        a, b = (np.asarray(Image.open(x), np.int16) for x in (p, tmp_path / "one" / p.relative_to(out)))
        assert np.abs(a - b).max() <= 1, p

    calls.clear()
    rc, _, stderr = cli(*argv(**{"--refs": "1,2"}))  # a new K: only its images are generated
    assert rc == 0 and len(calls) == 1, stderr[-3000:]
    assert len(read_rows(out / "per_image.csv")) == 8 and {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
    assert [r["refs"] for r in json.loads((out / "summary.json").read_text())["rows"]] == [1, 2]

    rc, _, stderr = cli(*argv(**{"--steps": 3}))  # --steps 3 would mix settings in one folder: refused
    assert rc == 2 and "other settings (steps differ)" in stderr


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_input(cli, pipe_dir, tiny_model_dir, extractor_dirs, fake_bench, tmp_path):
    dino, clip = extractor_dirs
    out = tmp_path / "out"
    base = {"--bench": fake_bench, "--refs": "1", "--samples": 1, "--steps": 1, "--out": out, "--dino": dino,
            "--clip": clip}

    def bad(pipeline=pipe_dir, **kw):
        opts = {**base, **{"--" + k.replace("_", "-"): v for k, v in kw.items()}}
        rc, _, err = cli(pipeline, *[x for k, v in opts.items() if v is not None for x in (k, v)])
        lines = [ln for ln in err.splitlines() if ln.startswith("jedi-eval: error:")]
        assert rc == 2 and len(lines) == 1, err[-3000:]
        assert not (out / "summary.json").exists()
        return lines[0]

    line = bad(tiny_model_dir)
    assert "no model_index.json" in line and "jedi-export" in line
    plain = shutil.copytree(pipe_dir, tmp_path / "plain")  # a pipeline whose UNet is not a joint one
    shutil.rmtree(plain / "unet")
    shutil.copytree(os.path.join(tiny_model_dir, "unet"), plain / "unet")
    assert "not a joint UNet" in bad(str(plain))
    assert "does not exist" in bad(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "no prompts_and_classes.txt" in bad(bench=tmp_path / "empty")
    assert "--subjects nosuch is not in" in bad(subjects="box,nosuch")
    assert "--subjects absent has no photo folder" in bad(subjects="absent")
    line = bad(refs="1,4")
    assert "--refs 4 is more than the 3 photos of subject box" in line
    line = bad(dino=None)
    assert "--dino is required for DINO" in line and "save_pretrained" in line
    assert "--clip is required" in bad(clip=None)
    assert "--clip /nope/clip does not exist" in bad(clip="/nope/clip")
    assert "not a ViT/DINOv2" in bad(dino=clip)
    assert "not a CLIPModel" in bad(clip=dino)
    assert "--refs 'x'" in bad(refs="x")
    assert "--samples 0 is too small" in bad(samples=0)
    assert "--masks" in bad(masks=tmp_path / "empty")

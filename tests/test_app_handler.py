"""jedi-app's handler (what the page calls), in-process on the tiny exported pipeline: real DreamBench photos
give what jedi-sample gives for the same settings; bad uploads raise gr.Error with one clear line."""
import json
import os
import zipfile

import numpy as np
import pytest
from helpers.images import bomb_png
from PIL import Image

gr = pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

from jedi_train.app import handler as handler_mod
from jedi_train.app.examples import build_examples
from jedi_train.app.handler import JeDiApp
from jedi_train.cli import sample

pytestmark = pytest.mark.usefixtures("one_thread")
DREAMBENCH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "dreambench")


@pytest.fixture(scope="module")
def app(pipe_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("app")
    return JeDiApp(sample.load_pipeline(pipe_dir, "cpu"), pipe_dir, max_refs=4, work_dir=str(work),
                   examples=build_examples(str(work / "examples")))


@pytest.fixture
def photos(tmp_path):
    """Two real DreamBench photos of one subject."""
    folder = os.path.join(DREAMBENCH, "can")
    if not os.path.isdir(folder):
        pytest.skip(f"no DreamBench photos at {os.path.abspath(folder)} (../shared/dreambench beside the repo)")
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:2]]


def pixels(img):
    return np.asarray(Image.open(img) if isinstance(img, str) else img, dtype=np.int16)


def test_dreambench_photos_give_what_jedi_sample_gives(app, photos, pipe_dir, tmp_path):
    gallery, used, archive, status, explained = app.generate(photos, "", "a can on the beach\n\n a can in the snow ",
                                                             1, 3, 3.0, 2.0, "dpm", "5")
    assert explained == []  # the explain box is off
    assert [caption for _, caption in gallery] == ["a can on the beach", "a can in the snow"]
    assert len(used) == 2 and all(Image.open(p).size == (32, 32) for p in used)
    assert "2 images from 2 reference(s)" in status and "seed 5" in status and "reference cache on" in status
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["00_00.png", "01_00.png", "grid.png", "references/", "references/00.png",
                                        "references/01.png", "settings.json"]
        settings = json.loads(z.read("settings.json"))

    out = tmp_path / "cli"
    rc = sample.main([pipe_dir, "--ref", photos[0], "--ref", photos[1], "--prompt", "a can on the beach",
                      "--prompt", "a can in the snow", "--num", "1", "--steps", "3", "--guidance", "3",
                      "--image-guidance", "2", "--scheduler", "dpm", "--seed", "5", "--out", str(out),
                      "--device", "cpu"])
    assert rc == 0
    with open(out / "settings.json") as f:
        cli = json.load(f)
    assert settings.keys() == cli.keys()
    for key in set(cli) - {"command", "sampling_seconds"}:
        assert settings[key] == cli[key], key
    for (png, _), o in zip(gallery, cli["outputs"]):  # one code path: the same pixels
        assert np.abs(pixels(png) - pixels(str(out / o["file"]))).max() == 0


def test_defaults_are_jedi_samples(app, pipe_dir):
    from jedi_train.app.ui import build_ui

    args = sample.parse_args([pipe_dir, "--num", "1", "--out", "x"])
    given = {k: getattr(args, k) for k in sample.SETTINGS}  # None: not given (the export's, else the defaults)
    d = {**{k: getattr(args, k) for k in sample.DEFAULTS}, **sample.resolve_settings(pipe_dir, given)[0]}
    assert d == sample.DEFAULTS  # this export records no recommended settings
    demo = build_ui(app, max_queue=3)
    assert (demo._queue.max_size, demo._queue.default_concurrency_limit) == (3, 1)  # queued, one at a time
    ui = {b.elem_id: b.value for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert (ui["steps"], ui["guidance"], ui["image-guidance"], ui["seed"], ui["scheduler"]) == (
        d["steps"], d["guidance"], d["image_guidance"], str(d["seed"]), "default")
    info = app.model_info()
    assert "JointUNet2DConditionModel" in info and "pixel space" in info and "32 px" in info and "Reference KV cache** on" in info and pipe_dir in info


def run(app, files, prompts="a can", **kw):
    args = {"num": 1, "steps": 2, "guidance": 3.0, "image_guidance": 1.5, "scheduler": "default", "seed": 0, **kw}
    return app.generate(files, "", prompts, *args.values())


def error(app, files, match, **kw):
    with pytest.raises(gr.Error) as e:
        run(app, files, **kw)
    msg = e.value.message
    assert match in msg and "\n" not in msg, msg
    return msg


def test_bad_uploads_are_one_line_errors(app, tmp_path, monkeypatch):
    upload = tmp_path / "gradio" / "0a1b2c"  # how Gradio stores uploads: a hashed folder per file
    upload.mkdir(parents=True)
    (upload / "notes.txt").write_text("not a photo")
    msg = error(app, [str(upload / "notes.txt")], "notes.txt is not a readable image")
    assert "JPEG/PNG/WebP" in msg and str(upload) not in msg  # the user's file name, no server paths
    assert "too many pixels" in error(app, [bomb_png(upload / "bomb.png", 15000, 15000)], "bomb.png")
    Image.new("RGB", (200, 150)).save(upload / "big.png")
    monkeypatch.setattr(handler_mod, "MAX_PIXELS", 100 * 100)
    assert "200x150 pixels, over the limit" in error(app, [str(upload / "big.png")], "big.png")
    monkeypatch.undo()
    with pytest.raises(gr.Error, match="notes.txt is not a readable image"):
        app.preview([str(upload / "notes.txt")])

    ok = [str(upload / "big.png")]
    assert "5 reference photos given, at most 4" in error(app, ok * 5, "--max-refs 5")
    assert "image guidance 1.5 needs them" in error(app, [], "set image guidance to 0")
    assert "no prompt given" in error(app, ok, "Prompts box", prompts=" \n ")
    assert "9 prompts given" in error(app, ok, "at most 8", prompts="\n".join("a" * 9))
    assert "is not a number" in error(app, ok, "\"random\"", seed="abc")
    assert "steps 0 is out of range" in error(app, ok, "1 to 200", steps=0)
    assert "scheduler 'euler'" in error(app, ok, "default, ddim, dpm", scheduler="euler")
    gallery, *_ = run(app, ok)  # the server is fine after all that
    assert len(gallery) == 1


def test_cmyk_and_animated_work_with_a_warning(app, tmp_path):
    Image.new("CMYK", (80, 60), (0, 200, 200, 0)).save(tmp_path / "print.jpg")
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    files = [str(tmp_path / "print.jpg"), str(tmp_path / "anim.gif")]
    with pytest.warns(UserWarning):  # gr.Warning outside a request: Python's warnings (a toast in the page)
        gallery, used, _, status, _ = run(app, files, prompts="a can\na mug", num=2)
    assert len(gallery) == 4 and len(used) == 2
    assert "print.jpg is CMYK; it was converted to RGB" in status
    assert "anim.gif is animated (3 frames); only its first frame is used" in status
    assert pixels(used[1])[16, 16].tolist() == [255, 0, 0]  # the first frame
    with pytest.warns(UserWarning):  # the upload preview says it at once
        assert [p.size for p in app.preview(files)] == [(32, 32), (32, 32)]


def test_examples_random_seed_and_text_only(app):
    names = list(app.examples)
    assert sum(n.startswith("procedural") for n in names) == 3
    assert any(n.startswith("DreamBench") for n in names) == os.path.isdir(DREAMBENCH)
    ex = app.examples[names[0]]
    gallery, used, archive, status, explained = app.generate(None, names[0], ex.prompts, 1, 2, 3.0, 1.5, "ddim",
                                                             "random", True)  # explain on
    assert len(gallery) == 2 and len(used) == len(ex.files) == 3
    # per result, one overlay per reference under it, captioned with the share of its attention
    assert [os.path.basename(p) for p, _ in explained] == [f"{r:02d}_00.attention.{k}.png" for r in range(2)
                                                           for k in range(3)]
    assert explained[4][1].startswith("result 2 (") and "reference 2," in explained[4][1]
    assert all(Image.open(p).size == (32, 32) for p, _ in explained)
    with zipfile.ZipFile(archive) as z:
        s = json.loads(z.read("settings.json"))
        assert "00_00.attention.0.png" in z.namelist() and s["explain"] is True
    assert s["scheduler"] == "DDIMScheduler" and f"seed {s['seed']}" in status and s["references"] == list(ex.files)
    gallery, used, _, status, _ = app.generate([], "", "a mug", 1, 2, 3.0, 0, "default", 1)  # plain text-to-image
    assert len(gallery) == 1 and used == [] and "reference cache off" in status

"""Split (grid detection, blank/duplicate panels), consistency filter, prompt sources."""
import json

import numpy as np
import pytest
from helpers.synth import view_sets
from omegaconf import OmegaConf

from data_pipelines.synth import procedural as P
from data_pipelines.synth.cli import CONF_DIR as CONF
from data_pipelines.synth.filter import ColorHistogram, ConsistencyFilter, build_filter
from data_pipelines.synth.prompts import FilePrompts, TemplatePrompts, guess_class
from data_pipelines.synth.split import clean_panels, detect_grid, split_collage, split_grid
from data_pipelines.synth.writer import SynthError


def _panels(n, res=32, seed=0):
    return [P.make_set(seed + i, 2, res)[0][0] for i in range(n)]


def _collage(rows, cols, res=32, seed=0):
    panels = _panels(rows * cols, res, seed)
    return panels, np.concatenate([np.concatenate(panels[r * cols:(r + 1) * cols], 1) for r in range(rows)], 0)


@pytest.mark.parametrize("rows, cols", [(2, 2), (2, 3), (1, 2), (3, 3)])
def test_grid_detection_and_split(rows, cols):
    panels, collage = _collage(rows, cols)
    assert detect_grid(collage) == (rows, cols)
    assert all(np.array_equal(a, b) for a, b in zip(split_grid(collage, rows, cols), panels))


def test_grid_detection_rates():
    """Over many random collages the grid is found, and single pictures are rarely read as collages
    (two neighbouring panels that happen to continue each other smoothly cannot be told apart)."""
    grids = [(2, 2), (2, 3), (1, 2), (3, 3), (2, 1), (1, 4), (4, 4)]
    hits = sum(detect_grid(_collage(*grids[t % 7], res=(32, 64)[t % 2], seed=100 * t)[1]) == grids[t % 7]
               for t in range(42))
    false = sum(detect_grid(P.make_set(5000 + t, 2, (32, 64, 128)[t % 3])[0][0]) is not None for t in range(30))
    assert hits >= 36 and false <= 3, (hits, false)


def test_no_seams_falls_back_to_fixed_grid():
    single = P.make_set(3, 2, 64)[0][0]
    assert detect_grid(single) is None
    _, _, _, grid = split_collage(single, 2, 2)
    assert grid == (2, 2)


def test_blank_and_duplicate_panels_are_dropped():
    a, b = _panels(2)
    blank = np.full_like(a, 200)
    near_copy = np.clip(a.astype(int) + 1, 0, 255).astype(np.uint8)
    keep, dropped = clean_panels([a, blank, b, near_copy])
    assert keep == [0, 2] and dropped == {1: "blank", 3: "duplicate"}


def test_filter_keeps_one_subject_and_rejects_mixed_subjects():
    f = build_filter(OmegaConf.load(CONF / "filter" / "color_histogram.yaml"))  # the shipped threshold
    kept = rejected = 0
    for seed in range(8):
        same, mixed = view_sets(seed, res=64)
        r_same, s_same = f.check(same)
        r_mixed, s_mixed = f.check(mixed)
        assert s_same["min"] > s_mixed["min"]  # the numbers behind each decision are returned
        kept += r_same is None
        rejected += r_mixed == "inconsistent_subject"
    assert kept >= 7 and rejected >= 7


def test_filter_reasons_and_thresholds():
    same, _ = view_sets(0, res=64)
    emb = ColorHistogram()
    assert ConsistencyFilter(emb, min_similarity=0.0).check([same[0], same[0].copy()])[0] == "near_duplicate"
    assert ConsistencyFilter(emb, min_similarity=1.01, max_similarity=2).check(same)[0] == "inconsistent_subject"
    assert ConsistencyFilter(emb, min_similarity=-1, max_similarity=2).check(same)[0] is None
    assert ConsistencyFilter(emb).check(same[:1])[0] == "too_few_images"
    with pytest.raises(SynthError, match="filter.pretrained=/nope does not exist"):
        build_filter({"embedder": "open_clip", "model": "ViT-B-32", "pretrained": "/nope"})
    with pytest.raises(SynthError, match="embedder='clipx' is unknown"):
        build_filter({"embedder": "clipx"})


def test_open_clip_filter_runs_on_a_tiny_local_model(tmp_path):
    """The open_clip path end to end (custom config JSON, random weights): embeddings are unit vectors
    and the thresholds decide. Random weights cannot judge identity, so no keep/reject claim here."""
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
    path = tmp_path / "synth-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    f = build_filter({"embedder": "open_clip", "model": "synth-tiny-clip", "model_config": str(path),
                      "min_similarity": -1.0, "max_similarity": 2.0})
    same, _ = view_sets(1, n=3, res=64)
    e = f.embed(same)
    assert e.shape == (3, 16) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    reason, stats = f.check(same)
    assert reason is None and -1 <= stats["min"] <= stats["max"] <= 1
    f.lo = stats["min"] + 1e-3
    assert f.check(same)[0] == "inconsistent_subject"


def test_prompt_sources(tmp_path):
    t = TemplatePrompts()
    a, b = t.subjects([1, 2, 1])[0], t.subjects([1, 2, 1])[2]
    assert a == b and a.cls in a.description and a.source == "templates"
    assert len({s.description for s in t.subjects(range(50))}) > 40
    f = tmp_path / "p.txt"
    f.write_text("# comment\nmug: a red ceramic mug with white dots\n\n{\"description\": \"a tiny green frog toy\"}\n"
                 "a blue backpack with patches\n")
    fp = FilePrompts(str(f))
    subs = fp.subjects([0] * 4, indices=[0, 1, 2, 3])
    assert [s.cls for s in subs] == ["mug", "toy", "backpack", "mug"]
    assert guess_class("a knitted teddy bear with a bow") == "bear"
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(SynthError, match="has no prompts"):
        FilePrompts(str(tmp_path / "empty.txt"))

"""jedi-data import: each format from a small replica of its real layout (tests/helpers/import_replicas.py),
bad rows of every kind included, and the refusals of a bad SRC or option."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers.import_replicas import (
    folders_src,
    picture,
    read_sets,
    run_import,
    size,
    subjects200k_src,
    syncd_src,
    uno1m_src,
)
from PIL import Image


# -- Subjects200K -------------------------------------------------------------------------------------
def test_subjects200k_splits_each_row_into_its_two_views_and_counts_every_bad_row(tmp_path):
    src, out = subjects200k_src(tmp_path / "s200k"), tmp_path / "out"
    assert run_import("subjects200k", src, out, "--sets-per-shard", 4) == 0
    sets = read_sets(out)
    assert len(sets) == 7  # 6 good rows + row 0 again in the second file
    first = sets[0]
    meta = first["json"]
    assert meta["num_images"] == 2 and meta["captions"] == ["a red mug in a kitchen", "the red mug on a desk"]
    assert meta["source"] == "subjects200k" and meta["source_id"] == "data/train-00000-of-00002.parquet:0"
    assert (meta["subject"], meta["class"], meta["view_size"], meta["padding"]) == ("mug 0", "Kitchenware", 24, 4)
    assert meta["image_ext"] == "jpg" and size(first["0.jpg"]) == size(first["1.jpg"]) == (24, 24)
    png = next(s for s in sets if s["json"]["image_ext"] == "png")  # a PNG source stays lossless
    whole = np.asarray(Image.open(io.BytesIO(picture(60, 32, 1))).convert("RGB"))
    assert png["json"]["source_id"].endswith(":1")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png["0.png"]))), whole[4:28, 4:28])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png["1.png"]))), whole[4:28, 32:56])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tool"] == "jedi-data import" and manifest["complete"] and manifest["sets"] == 7
    assert manifest["rejects"] == {"bad_geometry": 1, "invalid_description": 1, "low_imageQuality": 1,
                                   "low_objectConsistency": 1, "missing_caption": 1, "missing_file": 1,
                                   "undecodable_image": 1}
    assert manifest["config"]["min_quality"] == 5.0 and manifest["images"] == 14
    # shards never span parquet files: file 0 (3 rows) -> 1 shard, file 1 (11 rows) -> 3 shards of <= 4 rows
    assert [s["file"] for s in manifest["shards"]] == [f"sets-{k:06d}.tar" for k in range(4)]


def test_subjects200k_filters_are_configurable(tmp_path):
    src, out = subjects200k_src(tmp_path / "s200k"), tmp_path / "out"
    assert run_import("subjects200k", src, out, "--min-quality", 3, "--keep-invalid-descriptions",
                      "--view-size", 24) == 0
    rejects = json.loads((out / "manifest.json").read_text())["rejects"]
    assert "low_imageQuality" not in rejects and "invalid_description" not in rejects
    assert json.loads((out / "manifest.json").read_text())["sets"] == 9


# -- UNO-1M -------------------------------------------------------------------------------------------
def test_uno1m_pairs_images_straight_from_the_tar_gz_and_counts_bad_records(tmp_path):
    src, out = uno1m_src(tmp_path / "uno"), tmp_path / "out"
    assert run_import("uno1m", src, out, "--sets-per-shard", 3) == 0
    sets = read_sets(out)
    assert [s["json"]["source_id"] for s in sets] == [f"labels/split1.json:{i}" for i in range(4)] + \
        [f"labels/split2.json:{i}" for i in range(4)]  # label order, whatever the tar order
    s1 = sets[1]["json"]
    assert s1["captions"] == ["a teddy bear on a sofa", "the teddy bear at the beach"]
    assert s1["subject"] == "teddy bear" and s1["scores"]["score_final"] == 4.5 and s1["image_ext"] == "png"
    assert size(sets[1]["0.png"]) == (32, 32) and size(sets[0]["0.png"]) == (24, 32)  # original sizes
    assert sets[0]["1.png"] == picture(32, 24, 100)  # PNG files pass through byte for byte
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects"] == {"bad_geometry": 1, "low_score_final": 1, "missing_caption": 1, "missing_file": 1,
                                   "undecodable_image": 1}
    out2 = tmp_path / "out2"
    assert run_import("uno1m", src, out2, "--min-quality", 2.5) == 0
    assert json.loads((out2 / "manifest.json").read_text())["rejects"].get("low_score_final") is None


def test_uno1m_a_truncated_archive_imports_what_it_can(tmp_path):
    src = uno1m_src(tmp_path / "uno", n=6, bad=False)
    tgz = src / "images" / "split2.tar.gz"
    tgz.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    out = tmp_path / "out"
    assert run_import("uno1m", src, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert 6 <= manifest["sets"] < 12 and manifest["rejects"]["unreadable_archive"] == 12 - manifest["sets"]


# -- SynCD --------------------------------------------------------------------------------------------
def test_syncd_carries_masks_and_counts_bad_records(tmp_path):
    src, out = syncd_src(tmp_path / "syncd"), tmp_path / "out"
    assert run_import("syncd", src, out) == 0
    sets = read_sets(out)
    assert len(sets) == 4
    meta = sets[0]["json"]
    assert meta["masks"] is True and meta["num_images"] == 3 and meta["captions"][2] == "a toy car, view 2"
    assert meta["source_id"] == "rigid/metadata_with_scores.json:0" and len(meta["dino_scores"]) == 3
    mask = np.asarray(Image.open(io.BytesIO(sets[0]["0.mask.png"])))
    assert mask.shape == (24, 32) and set(np.unique(mask)) == {0, 255} and mask[12, 16] == 255 and mask[0, 0] == 0
    assert sets[0]["0.jpg"] == (src / "rigid" / "imgs" / "s0_0.jpg").read_bytes()  # JPEGs pass through
    assert json.loads((out / "manifest.json").read_text())["rejects"] == {
        "missing_caption": 1, "missing_file": 1, "missing_mask": 1, "undecodable_image": 1}


def test_syncd_dino_and_aesthetics_filters_drop_images_as_syncd_does(tmp_path):
    src, out = syncd_src(tmp_path / "syncd"), tmp_path / "out"
    assert run_import("syncd", src, out, "--min-dino", 0.8, "--min-quality", 5, "--limit", 4) == 0
    sets = read_sets(out)  # image 2 of each set: aesthetics 4 and DINO 0.5 to both others: dropped
    assert len(sets) == 4 and all(s["json"]["num_images"] == 2 for s in sets)
    assert sets[0]["json"]["dino_scores"] == [[1.0, 0.9], [0.9, 1.0]]
    out2 = tmp_path / "out2"
    assert run_import("syncd", src, out2, "--min-dino", 0.95, "--limit", 4) == 0
    assert json.loads((out2 / "manifest.json").read_text())["rejects"] == {"low_dino": 4}


# -- folders ------------------------------------------------------------------------------------------
def test_folders_cover_every_image_with_its_caption(tmp_path):
    src, out = folders_src(tmp_path / "photos"), tmp_path / "out"
    assert run_import("folders", src, out, "--set-size", 3, "--caption", "a photo of a {subject} ({class})") == 0
    sets = read_sets(out)
    by = {}
    for s in sets:
        by.setdefault(s["json"]["source_id"], []).append(s["json"])
    assert sorted(by) == ["cat", "dog", "shoes/pair1"]
    dog = by["dog"]
    assert len(dog) == 2 and all(m["num_images"] == 3 for m in dog)
    assert sorted({f for m in dog for f in m["files"]}) == [f"dog/d{k}.jpg" for k in range(5)]  # all covered
    for m in dog:
        assert m["captions"] == [f"a photo of my dog, shot {f[5]}" for f in m["files"]]  # sidecars
    cat = by["cat"][0]
    assert [c for c in cat["captions"]] == [f"cat {f[5]}" if f[5] != "2" else "a photo of a cat (cat)"
                                            for f in cat["files"]]  # jsonl first, the template for c2
    shoes = by["shoes/pair1"][0]
    assert shoes["class"] == "shoes" and shoes["captions"][0] == "a photo of a pair1 (shoes)"
    assert shoes["image_ext"] == "jpg"  # WEBP is re-encoded (the set schema holds jpg / png)
    rotated = next(s for s in sets if "dog/d0.jpg" in s["json"]["files"])
    assert size(rotated[f"{rotated['json']['files'].index('dog/d0.jpg')}.jpg"]) == (24, 32)  # EXIF applied
    assert json.loads((out / "manifest.json").read_text())["rejects"] == {"too_few_images": 1, "undecodable_image": 1}
    # reproducible: the same seed draws the same sets, another seed others
    again, other = tmp_path / "again", tmp_path / "other"
    run_import("folders", src, again, "--set-size", 3, "--caption", "a photo of a {subject} ({class})")
    run_import("folders", src, other, "--set-size", 3, "--caption", "a photo of a {subject} ({class})", "--seed", 1)
    assert [s["json"]["files"] for s in read_sets(again)] == [s["json"]["files"] for s in sets]
    assert [s["json"]["files"] for s in read_sets(other)] != [s["json"]["files"] for s in sets]


def test_folders_without_a_caption_source_count_missing_captions(tmp_path):
    src, out = folders_src(tmp_path / "photos"), tmp_path / "out"
    assert run_import("folders", src, out, "--set-size", 3) == 0
    rejects = json.loads((out / "manifest.json").read_text())["rejects"]
    assert rejects == {"missing_caption": 3, "too_few_images": 1}  # cat (c2 has none), shoes, broken; dog: sidecars


# -- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unknown_format", "no_src", "no_parquet", "not_subjects200k", "uno_no_tar",
                                  "syncd_no_metadata", "folders_empty", "bad_split", "bad_template"])
def test_a_bad_src_or_option_is_refused_in_one_line(tmp_path, capsys, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty"
    empty.mkdir()
    args = {"unknown_format": ["laion", empty], "no_src": ["subjects200k", tmp_path / "nowhere"],
            "no_parquet": ["subjects200k", empty], "not_subjects200k": ["subjects200k", tmp_path / "other.parquet"],
            "uno_no_tar": ["uno1m", tmp_path / "uno"], "syncd_no_metadata": ["syncd", empty],
            "folders_empty": ["folders", empty], "bad_split": ["folders", tmp_path / "f", "--num-shards", 2,
                                                                "--shard-index", 2],
            "bad_template": ["folders", tmp_path / "f", "--caption", "a {thing}"]}[case]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "other.parquet")
    (tmp_path / "uno" / "labels").mkdir(parents=True)
    (tmp_path / "uno" / "labels" / "split3.json").write_text("[]")
    (tmp_path / "f" / "a").mkdir(parents=True)
    for k in range(2):
        (tmp_path / "f" / "a" / f"{k}.png").write_bytes(picture(8, 8, k))
    out = tmp_path / "out"
    assert run_import(args[0], args[1], out, *args[2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jedi-data import: error:"), err
    expect = {"unknown_format": "subjects200k, uno1m, syncd, folders", "no_src": "does not exist",
              "no_parquet": "no .parquet", "not_subjects200k": "no column(s)", "uno_no_tar": "images/split3.tar.gz",
              "syncd_no_metadata": "metadata.json", "folders_empty": "2 or more images",
              "bad_split": "--shard-index 2", "bad_template": "placeholder"}[case]
    assert expect in err[0], err
    assert not out.exists()  # refused before anything was written

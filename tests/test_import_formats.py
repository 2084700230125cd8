"""jedi-data import: each format from a small replica of its real layout, bad rows of every kind included.

The builders here (subjects200k_src, uno1m_src, syncd_src, folders_src) are shared with test_import_runs.py.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines.stats import main as jedi_data

GOOD_QA = {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5}


def picture(w: int, h: int, seed: int, fmt: str = "PNG", exif_rotate: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.repeat(np.repeat(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8), 4, 0), 4, 1)
    img, buf = Image.fromarray(arr[:h, :w]), io.BytesIO()
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        img.save(buf, format=fmt, exif=exif)
    else:
        img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def read_sets(out_dir) -> list[dict]:
    """Every set of every shard, in shard order: {"json": meta, "<key>": bytes}."""
    sets = []
    for shard in sorted(out_dir.glob("sets-*.tar")):
        with tarfile.open(shard) as tf:
            cur = {}
            for m in tf:
                key, _, field = m.name.partition(".")
                if cur and cur["__key__"] != key:
                    sets.append(cur)
                    cur = {}
                cur["__key__"] = key
                data = tf.extractfile(m).read()
                cur[field] = json.loads(data) if field == "json" else data
            if cur:
                sets.append(cur)
    return sets


def size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def run_import(*args) -> int:
    return jedi_data(["import", *map(str, args), "--no-progress"])


# -- Subjects200K -------------------------------------------------------------------------------------
def s200k_row(seed, s=24, p=4, fmt="PNG", qa=GOOD_QA, valid=True, d1="the red mug on a desk", image=None):
    return {"image": image if image is not None else {"bytes": picture(2 * s + 3 * p, s + 2 * p, seed, fmt),
                                                      "path": None},
            "collection": "collection_2", "quality_assessment": qa,
            "description": {"item": f"mug {seed}", "description_0": "a red mug in a kitchen", "description_1": d1,
                            "category": "Kitchenware", "description_valid": valid}}


def subjects200k_src(root, good=6, bad=True):
    """data/train-0000{0,1}-of-00002.parquet as `datasets` writes them (Image feature = struct{bytes, path},
    features in the schema metadata), row groups of 3 rows; file 1 holds the bad rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [s200k_row(i, fmt="PNG" if i % 2 else "JPEG") for i in range(good)]
    bad_rows = [
        s200k_row(100, image={"bytes": b"not an image at all", "path": "x.png"}),     # undecodable_image
        s200k_row(101, image={"bytes": picture(40, 40, 1), "path": None}),              # bad_geometry
        s200k_row(102, d1="  "),                                                        # missing_caption
        s200k_row(103, image={"bytes": None, "path": "gone/103.png"}),                  # missing_file
        s200k_row(104, qa={**GOOD_QA, "imageQuality": 3}),                              # low_imageQuality
        s200k_row(105, qa={**GOOD_QA, "objectConsistency": None}),                      # low_objectConsistency
        s200k_row(106, valid=False),                                                    # invalid_description
    ] if bad else []
    features = {"image": {"_type": "Image"}, "collection": {"dtype": "string", "_type": "Value"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    (root / "data").mkdir(parents=True)
    halves = [rows[:good // 2], rows[good // 2:] + bad_rows[:3] + [rows[0]] + bad_rows[3:]]
    for k, part in enumerate(halves):
        table = pa.Table.from_pylist(part).replace_schema_metadata(meta)
        pq.write_table(table, root / "data" / f"train-{k:05d}-of-00002.parquet", row_group_size=3)
    return root


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
def uno_record(a, b, score=4.5, cap1="a teddy bear on a sofa", cap2="the teddy bear at the beach"):
    return {"img_path1": f"split{a[0]}/{a[1]}", "img_path2": f"split{b[0]}/{b[1]}",
            "caption": {"img_path1": cap1, "img_path2": cap2, "judgment": "same", "subject": "teddy bear"},
            "vlm_filter_cot": {"score_part": {"identity": score}, "score_final": score}}


def uno1m_src(root, n=4, bad=True):
    """images/split{1,2}.tar.gz (split{N}/<name>_{W}x{H}.png) + labels/split{1,2}.json. In split1 the partner
    of record 0 comes last in the tar (the reader must wait for it)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for split in (1, 2):
        members, records = {}, []
        for i in range(n):
            w, h = 24 + 8 * (i % 2), 32
            a, b = f"obj_{split}_{i}_1_{w}x{h}.png", f"obj_{split}_{i}_2_{h}x{w}.png"
            members[a], members[b] = picture(w, h, 10 * split + i), picture(h, w, 100 * split + i)
            records.append(uno_record((split, a), (split, b)))
        if split == 1 and bad:
            members["broken_1_32x32.png"] = b"\x89PNG truncated"
            members["liar_1_40x30.png"] = picture(30, 30, 7)
            records += [uno_record((1, "obj_1_0_1_24x32.png"), (1, "broken_1_32x32.png")),   # undecodable_image
                        uno_record((1, "obj_1_1_1_32x32.png"), (1, "liar_1_40x30.png")),     # bad_geometry
                        uno_record((1, "obj_1_0_1_24x32.png"), (1, "obj_1_1_1_32x32.png"), cap2=""),  # missing_caption
                        uno_record((1, "obj_1_0_1_24x32.png"), (1, "not_in_tar_8x8.png")),   # missing_file
                        uno_record((1, "obj_1_0_1_24x32.png"), (1, "obj_1_1_1_32x32.png"), score=3.0)]  # low score
        order = sorted(members, key=lambda m: m == "obj_1_0_2_32x24.png")  # record 0's partner last
        with tarfile.open(root / "images" / f"split{split}.tar.gz", "w:gz") as tf:
            for name in order:
                info = tarfile.TarInfo(f"split{split}/{name}")
                info.size = len(members[name])
                tf.addfile(info, io.BytesIO(members[name]))
        (root / "labels" / f"split{split}.json").write_text(json.dumps(records))
    return root


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
def syncd_src(root):
    """rigid/metadata_with_scores.json (+ a plain metadata.json beside it, ignored) with images in rigid/imgs/
    and masks in rigid/imgs/masks/<stem>.jpg, as SynCD's unzip.sh leaves them."""
    d = root / "rigid"
    (d / "imgs" / "masks").mkdir(parents=True)

    def add(name, seed, mask=True, broken=False):
        (d / "imgs" / name).write_bytes(b"garbage" if broken else picture(32, 24, seed, "JPEG"))
        if mask:
            m = np.zeros((12, 16), np.uint8)  # half size: resized to the image's
            m[3:9, 4:12] = 250
            Image.fromarray(m).save(d / "imgs" / "masks" / f"{name[:-4]}.jpg", quality=90)

    records = []
    dino = [[1.0, 0.9, 0.5], [0.9, 1.0, 0.5], [0.5, 0.5, 1.0]]
    for i in range(4):
        names = [f"s{i}_{k}.jpg" for k in range(3)]
        for k, n in enumerate(names):
            add(n, 10 * i + k)
        records.append({"filenames": [f"imgs/{n}" for n in names], "prompts": [f"a toy car, view {k}" for k in range(3)],
                        "dino_scores": dino, "aesthetics_scores": {n[:-4]: 6.0 - (k == 2) * 2 for k, n in enumerate(names)}})
    add("m0.jpg", 50, mask=False)
    add("u0.jpg", 51, broken=True)
    add("ok.jpg", 52)
    records += [
        {"filenames": ["imgs/ok.jpg", "imgs/m0.jpg"], "prompts": ["a", "b"]},        # missing_mask
        {"filenames": ["imgs/ok.jpg", "imgs/nope.jpg"], "prompts": ["a", "b"]},      # missing_file
        {"filenames": ["imgs/ok.jpg", "imgs/u0.jpg"], "prompts": ["a", "b"]},        # undecodable_image
        {"filenames": ["imgs/ok.jpg", "imgs/s0_0.jpg"], "prompts": ["a"]},           # missing_caption
    ]
    (d / "metadata_with_scores.json").write_text(json.dumps(records))
    (d / "metadata.json").write_text(json.dumps(records[:1]))
    return root


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
def folders_src(root):
    """dog/ (sidecar .txt captions, 5 images, one EXIF-rotated), cat/ (metadata.jsonl), shoes/pair1/images/
    (nested, template captions), lonely/ (1 image), broken/ (an undecodable file)."""
    for d in ("dog", "cat", "shoes/pair1/images", "lonely", "broken"):
        (root / d).mkdir(parents=True)
    for k in range(5):
        (root / "dog" / f"d{k}.jpg").write_bytes(picture(32, 24, k, "JPEG", exif_rotate=k == 0))
        (root / "dog" / f"d{k}.txt").write_text(f"a photo of my dog, shot {k}\n")
    for k in range(3):
        (root / "cat" / f"c{k}.png").write_bytes(picture(24, 24, 10 + k))
        (root / "shoes" / "pair1" / "images" / f"{k}.webp").write_bytes(picture(24, 24, 20 + k, "WEBP"))
    (root / "cat" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"c{k}.png", "text": f"cat {k}"}) + "\n"
                                                         for k in range(2)))
    (root / "lonely" / "one.jpg").write_bytes(picture(24, 24, 30, "JPEG"))
    (root / "broken" / "a.jpg").write_bytes(picture(24, 24, 31, "JPEG"))
    (root / "broken" / "b.jpg").write_bytes(b"\xff\xd8 not really")
    return root


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

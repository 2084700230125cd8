"""Small replicas of the datasets `jedi-data import` reads, in their real layouts, bad rows included
(tests/test_import_*.py): Subjects200K parquet, UNO-1M tar.gz + labels, SynCD folders with masks, photo folders."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

from jedi_train.cli.data import main as jedi_data

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

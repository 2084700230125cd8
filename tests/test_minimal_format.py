"""Sets written by other tools (issue 12): no set_id/num_images/image_ext in the json, images 0..N-1
with any of jpg/jpeg/png/webp, captions from the json's list or per-image .txt files."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.schema import set_meta, validate_sample
from data_pipelines.stream import SetStream, StreamConfig

FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
EXTS = ("jpg", "png", "webp", "jpeg")
JEDI_DATA = os.path.join(os.path.dirname(sys.executable), "jedi-data")


def colour(k: int, i: int) -> tuple[int, int, int]:
    return (40 * i + 20, 200 - 30 * k, 90)


def image(k: int, i: int, ext: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), colour(k, i)).save(buf, format=FORMATS[ext], quality=95, lossless=True)
    return buf.getvalue()


def images(k: int, n: int) -> dict[str, bytes]:
    return {f"{i}.{EXTS[(i + k) % 4]}": image(k, i, EXTS[(i + k) % 4]) for i in range(n)}  # mixed extensions


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("minimal")
    with wds.TarWriter(str(d / "json-0000.tar")) as w:  # json captions: 3 sets of 4
        for k in range(3):
            w.write({"__key__": f"jset{k}", **images(k, 4),
                     "json": json.dumps({"captions": [f"json set {k} image {i}" for i in range(4)],
                                         "source": "another tool"}).encode()})
    with wds.TarWriter(str(d / "txt-0000.tar")) as w:  # .txt captions: 3 sets of 3 (one with unrelated json)
        # broken ones first (the stream stops after 3 sets): a tar cut short (3 captions, 2 images),
        # a gap in the numbering, a caption missing
        w.write({"__key__": "cut", **images(6, 2), "json": json.dumps({"captions": ["a", "b", "c"]}).encode()})
        gap = images(7, 3)
        del gap[next(k for k in gap if k.startswith("1."))]
        w.write({"__key__": "gap", **gap, "0.txt": b"a", "2.txt": b"c"})
        w.write({"__key__": "uncaptioned", **images(8, 2), "0.txt": b"a"})
        for k in range(3, 6):
            extra = {"json": b'{"license": "cc-by"}'} if k == 3 else {}
            w.write({"__key__": f"tset{k}", **images(k, 3), **extra,
                     **{f"{i}.txt": f"txt set {k} image {i}\n".encode() for i in range(3)}})
    return d


def stream(pattern: str, n: int, sets: int) -> list[dict]:
    cfg = StreamConfig(sources=pattern, resolution=16, min_set=n, max_set=n, batch_size=1, shuffle_buffer=1,
                       epoch_sets=sets)
    return list(iter(SetStream(cfg)))


@pytest.mark.parametrize("name,n,first", [("json", 4, 0), ("txt", 3, 3)])
def test_minimal_sets_stream_with_their_captions_and_images(shards, name, n, first):
    batches = stream(str(shards / f"{name}-*.tar"), n, 3)
    assert [b["set_id"][0] for b in batches] == [f"{name[0]}set{k}" for k in range(first, first + 3)]
    for b, k in zip(batches, range(first, first + 3)):
        caps = b["captions"][0]
        assert sorted(caps) == [f"{name} set {k} image {i}" for i in range(n)] and bool(b["valid"].all())
        for j, cap in enumerate(caps):  # each image travels with its own caption
            i = int(cap.rsplit(" ", 1)[1])
            px = ((b["pixel_values"][0, j, :, 8, 8] + 1) * 127.5).round().numpy()
            assert np.abs(px - colour(k, i)).max() <= 8, (cap, px)
    if name == "txt":
        assert batches[-1]["_stream"]["skipped"] == {"missing_image": 2, "no_captions": 1}


def test_set_meta_of_the_minimal_form():
    sample = {"__key__": "x", **images(0, 3), "json": json.dumps({"captions": ["a", "b", "c"]}).encode(),
              "0.mask.png": b"m"}  # a mask is not an image
    meta = set_meta(sample)
    assert (meta["set_id"], meta["num_images"]) == ("x", 3)
    assert meta["image_keys"] == ["0.jpg", "1.png", "2.webp"]
    assert validate_sample({**sample, "0.png": b"?"}) == "duplicate_image"
    assert validate_sample({"__key__": "y", **images(0, 2)}) == "missing_json"  # no json, no .txt


def test_jedi_data_stats_accepts_minimal_sets(shards):
    p = subprocess.run([JEDI_DATA, "stats", str(shards / "*.tar"), "--json"], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(p.stdout)
    assert s["sets"] == 6 and s["images"] == 3 * 4 + 3 * 3
    assert s["stored_set_sizes"] == {"3": 3, "4": 3}
    assert s["skipped"] == {"missing_image": 2, "no_captions": 1}

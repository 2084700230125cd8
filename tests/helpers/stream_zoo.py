"""A zoo of broken and odd data, shared by the robustness and `jedi-data stats` tests, and stream_all
(one pass of the training stream over it)."""
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.resume import ResumableLoader
from data_pipelines.stream import SetStream, StreamConfig
from helpers.stream_helpers import encode_image, set_json, write_raw_tar, write_shards


def _png(img):
    return encode_image(img, "PNG")


def rgb(size=24, value=(200, 40, 40)):
    return Image.new("RGB", (size, size), value)


# set id -> what the stream must do with it
KEPT = {"gray", "rgba", "palette", "sixteen", "cmyk", "huge_jpeg", "one_tiny", "one_bad", "latin1", "caption_int"}
SKIPPED = {"missing_json": "missing_json", "no_captions": "no_captions", "single": "too_few_images",
           "bad_json": "bad_json", "missing_image": "missing_image", "two_bad": "too_few_decodable_images",
           "too_large": "too_few_decodable_images"}


def write_zoo(root: str) -> dict:
    os.makedirs(root, exist_ok=True)
    good = write_shards(root, num_shards=2, sets_per_shard=4, set_sizes=(2, 3), size=24, prefix="good")
    m = {}

    def add(set_id, images, ext="png", captions=None, raw_json=None, drop=()):
        raw = raw_json if raw_json is not None else set_json(set_id, len(images), captions, ext)
        if raw_json is not False:
            m[f"{set_id}.json"] = raw
        for i, data in enumerate(images):
            if i not in drop:
                m[f"{set_id}.{i}.{ext}"] = data

    add("gray", [_png(Image.new("L", (24, 24), 90))] * 2)
    add("rgba", [_png(Image.new("RGBA", (24, 24), (255, 0, 0, 0)))] * 2)  # fully transparent -> white
    add("palette", [_png(rgb().convert("P"))] * 2)
    add("sixteen", [_png(Image.fromarray(np.full((24, 24), 32768, dtype=np.uint16)))] * 2)
    add("cmyk", [encode_image(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG")] * 2, ext="jpg")
    add("huge_jpeg", [encode_image(rgb(1, (10, 200, 10)).resize((3000, 1500)), "JPEG")] * 2, ext="jpg")
    add("one_tiny", [_png(rgb(24))] * 2 + [_png(rgb(4))])
    add("one_bad", [_png(rgb(24))] * 2 + [b"\x89PNG not really"])
    add("latin1", [_png(rgb())] * 2, raw_json=set_json("latin1", 2, ["caf\u00e9 one", "caf\u00e9 two"])
        .decode().replace("\\u00e9", "\u00e9").encode("latin-1"))
    add("caption_int", [_png(rgb())] * 2, captions=[7, None])
    add("missing_json", [_png(rgb())] * 2, raw_json=False)
    add("no_captions", [_png(rgb())] * 2, raw_json=json.dumps({"set_id": "no_captions", "num_images": 2,
                                                                  "image_ext": "png"}).encode())
    add("single", [_png(rgb())])
    add("bad_json", [_png(rgb())] * 2, raw_json=b"{not json")
    add("missing_image", [_png(rgb())] * 3, drop=(1,))
    add("two_bad", [_png(rgb()), b"garbage"])
    add("too_large", [_png(Image.new("RGB", (2500, 2500)))] * 2)  # over max_image_pixels below
    zoo = write_raw_tar(os.path.join(root, "zoo.tar"), m)
    with open(os.path.join(root, "garbage.tar"), "wb") as f:  # not a tar at all
        f.write(os.urandom(5000))
    raw = Path(good[1]).read_bytes()  # the second good shard, truncated: its first sets survive
    Path(good[1]).write_bytes(raw[: len(raw) // 2])
    return {"good": good, "zoo": zoo}


MAX_PIXELS = 5_000_000


def stream_all(pattern, **kw):
    cfg = StreamConfig(sources=pattern, resolution=16, batch_size=1, shuffle_buffer=1, epoch_sets=200,
                       max_image_pixels=MAX_PIXELS, **kw)
    loader = ResumableLoader(SetStream(cfg, num_workers=0), 0)
    it = iter(loader)
    seen = {}
    for batch in it:  # the truncated + garbage shards come round in every pass: one pass is enough
        sid = batch["set_id"][0]
        if sid in seen:
            break
        seen[sid] = batch
    it.close()
    return seen, loader

"""Tiny set shards for the stream tests, written with webdataset.ShardWriter + schema.encode_set."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import webdataset as wds

from data_pipelines.schema import encode_set


def solid_images(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8) for _ in range(n)]


def write_shards(out_dir: str, num_shards: int = 4, sets_per_shard: int = 8, set_sizes=(2, 3, 4, 5),
                 size: int = 32, prefix: str = "s", ext: str = "jpg") -> list[str]:
    """Shards of sets named <prefix><shard>_<i>; set sizes cycle through `set_sizes`."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = os.path.join(out_dir, f"{prefix}-{shard:04d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(sets_per_shard):
                k = shard * sets_per_shard + i
                n = set_sizes[k % len(set_sizes)]
                set_id = f"{prefix}{shard}_{i}"
                w.write(encode_set(set_id, solid_images(n, size, seed=k),
                                   [f"a photo of subject {k} view {j}" for j in range(n)], ext=ext))
        paths.append(path)
    return paths


def write_raw_tar(path: str, members: dict[str, bytes]) -> str:
    """A tar with exactly these members (for samples the schema writer refuses to produce)."""
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def encode_image(img, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def set_json(set_id: str, n: int, captions=None, ext: str = "png", **extra) -> bytes:
    meta = {"schema_version": 1, "set_id": set_id, "num_images": n, "image_ext": ext,
            "captions": captions if captions is not None else [f"caption {j}" for j in range(n)], **extra}
    return json.dumps(meta).encode()

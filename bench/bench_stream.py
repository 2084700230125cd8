"""Set stream throughput: the full loader (validate + decode + crop + subsample + refs + tokenize +
pad/batch, 2 workers) vs a bare WebDataset read + image decode of the same shards, same run.

Goal: ratio >= 0.9 against webdataset's standard PIL decode. A second baseline decodes with
simplejpeg, the decoder the loader itself uses for plain JPEGs: the ratio to it is the loader's own
overhead (validation, crop, subsample, refs, tokenize, pad, IPC), decoder speed factored out. Two configurations of the full loader: `all images` decodes every image of every
set at the stored resolution (the same decode work as the baseline); `training default` subsamples
sets to 2-4 images (so decodes fewer) the way conf/data/sets.yaml does.
"""
import os
import tempfile
import time

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

SHARDS, SETS_PER_SHARD, SET_SIZE, RES, WORKERS = 8, 96, 4, 128, 2


def write_shards(out_dir):
    from data_pipelines.schema import encode_set

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:RES, 0:RES]
    for s in range(SHARDS):
        with wds.TarWriter(os.path.join(out_dir, f"bench-{s:04d}.tar")) as w:
            for i in range(SETS_PER_SHARD):
                imgs = []
                for _ in range(SET_SIZE):  # smooth colour fields + noise: JPEGs of a realistic size
                    base = rng.integers(0, 256, 3) * ((xx + yy)[..., None] / (2 * RES))
                    imgs.append(Image.fromarray((base + rng.normal(0, 12, (RES, RES, 3))).clip(0, 255).astype(np.uint8)))
                caps = [f"a photo of a toy {i % 7} in scene {j}" for j in range(SET_SIZE)]
                w.write(encode_set(f"b{s}_{i}", imgs, caps))
    return f"{out_dir}/bench-{{0000..{SHARDS - 1:04d}}}.tar"


def _simplejpeg(key, data):
    if key.endswith("jpg"):
        import simplejpeg

        return simplejpeg.decode_jpeg(data, "RGB")
    return None


def bare(urls, decoder="pil"):
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker).decode(decoder)
    t0, n = time.perf_counter(), 0
    for sample in DataLoader(ds, batch_size=None, num_workers=WORKERS, collate_fn=lambda x: x):
        n += 1
    return n / (time.perf_counter() - t0)


def full(urls, tokenizer, **kw):
    from data_pipelines.resume import ResumableLoader
    from data_pipelines.stream import SetStream, StreamConfig
    from jedi_train.models.components import tokenize

    cfg = StreamConfig(sources=urls, resolution=RES, batch_size=8, shuffle_buffer=64,
                       epoch_sets=SHARDS * SETS_PER_SHARD, **kw)
    stream = SetStream(cfg, tokenize=lambda caps: tokenize(tokenizer, caps), num_workers=WORKERS)
    t0, n = time.perf_counter(), 0
    for batch in ResumableLoader(stream, WORKERS):
        n += len(batch["set_id"])
    return n / (time.perf_counter() - t0)


def main():
    from jedi_train.models.tiny import build_tiny_tokenizer

    with tempfile.TemporaryDirectory() as d:
        urls = write_shards(d)
        tok = build_tiny_tokenizer(os.path.join(d, "tok"))
        bare(urls)  # warm the page cache and the import paths
        runs = {"bare webdataset read+decode": bare,
                "bare webdataset read+decode (simplejpeg)": lambda u: bare(u, _simplejpeg),
                "full loader, all images": lambda u: full(u, tok, min_set=SET_SIZE, max_set=SET_SIZE),
                "full loader, training default (2-4 images)": lambda u: full(u, tok, min_set=2, max_set=4)}
        best = {name: max(fn(urls) for _ in range(3)) for name, fn in runs.items()}
    base = best["bare webdataset read+decode"]
    print(f"{SHARDS * SETS_PER_SHARD} sets of {SET_SIZE} x {RES}px JPEG, {WORKERS} workers, best of 3")
    for name, rate in best.items():
        print(f"{name:45s} {rate:8.1f} sets/s   {rate / base:5.2f}x")


if __name__ == "__main__":
    main()

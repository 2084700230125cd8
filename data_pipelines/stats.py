"""`jedi-data stats SHARDS...`: check a dataset before spending GPU hours on it.
(`jedi-data encode`, which caches latents + text embeddings, lives in encode.py.)

Streams the shards through the training stream's own validation and decoding (every image of
every set) and prints sets, images, the set-size histogram, caption lengths and what was skipped
or repaired, by reason. Exit 0 when at least one usable set was read (even if some data is bad),
1 when nothing is readable, 2 when the arguments name no shard.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter

import numpy as np
from webdataset.shardlists import expand_urls

from data_pipelines.schema import SkipSet, set_meta
from data_pipelines.sets import SetOptions, load_image, read_captions
from data_pipelines.shards import expand_sources, read_tar
from data_pipelines.skips import Counts


def collect(patterns: list[str], min_set: int = 2, resolution: int = 32, allow_pipe: bool = False,
            max_image_pixels: int = SetOptions.max_image_pixels, min_image_size: int = SetOptions.min_image_size) -> dict:
    sources = expand_sources(patterns, allow_pipe)
    urls = [u for s in sources for u in s.urls]
    opt = SetOptions(resolution=resolution, min_set=min_set, crop="center", max_image_pixels=max_image_pixels,
                     min_image_size=min_image_size)
    counts, rng = Counts(log_every_s=float("inf")), np.random.default_rng(0)
    sizes, usable, caption_words = Counter(), Counter(), []
    for url in urls:
        for _, sample in read_tar(url, counts):
            try:
                meta = set_meta(sample)
            except SkipSet as e:
                counts.skip(str(e))
                continue
            captions = read_captions(sample.get("json"), meta, counts)
            ok = [i for i, key in enumerate(meta["image_keys"])
                  if load_image(sample[key], opt, rng, counts) is not None]
            sizes[meta["num_images"]] += 1
            if len(ok) < min_set:
                counts.skip("too_few_images" if meta["num_images"] < min_set else "too_few_decodable_images")
                continue
            usable[len(ok)] += 1
            caption_words += [len(captions[i].split()) for i in ok]
    words = np.array(caption_words or [0])
    return {"shards": len(urls), "sets": sum(usable.values()), "images": sum(k * v for k, v in usable.items()),
            "set_size_histogram": dict(sorted(usable.items())), "stored_set_sizes": dict(sorted(sizes.items())),
            "caption_words": {"min": int(words.min()), "mean": round(float(words.mean()), 2),
                              "max": int(words.max())},
            "skipped": dict(sorted(counts.skipped.items())), "repaired": dict(sorted(counts.repaired.items()))}


def _print(s: dict) -> None:
    print(f"shards  {s['shards']}")
    print(f"sets    {s['sets']} usable   images {s['images']}")
    print("set size (usable images): " + "  ".join(f"{k}: {v}" for k, v in s["set_size_histogram"].items()))
    w = s["caption_words"]
    print(f"caption words: min {w['min']}  mean {w['mean']}  max {w['max']}")
    for title, d in (("skipped", s["skipped"]), ("repaired", s["repaired"])):
        print(f"{title}: " + ("  ".join(f"{k}={v}" for k, v in d.items()) or "none"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jedi-data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="read shards like training does and report what is usable")
    st.add_argument("shards", nargs="+", help="shard URL patterns: 'dir/*.tar', 'dir/shard-{0000..0099}.tar', s3://...")
    st.add_argument("--min-set", type=int, default=2, help="smallest usable set (as data.min_set)")
    st.add_argument("--resolution", type=int, default=32, help="decode check resolution")
    st.add_argument("--max-image-pixels", type=int, default=SetOptions.max_image_pixels, help="as data.max_image_pixels")
    st.add_argument("--min-image-size", type=int, default=SetOptions.min_image_size, help="as data.min_image_size")
    st.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    st.add_argument("--json", action="store_true", help="print the stats as JSON")
    from data_pipelines import encode
    from data_pipelines.importers import cli as importers

    encode.add_parser(sub)
    importers.add_parser(sub)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.cmd == "encode":
        return encode.main(args)
    if args.cmd == "import":
        return importers.main(args)
    pipes = [u for pattern in args.shards for u in expand_urls(pattern) if u.startswith("pipe:")]
    if pipes and not args.allow_pipe:  # refused here, so the hint names this tool's flag, not data.allow_pipe
        print(f"jedi-data: refusing {pipes[0]!r}: pipe: URLs run shell commands; pass --allow-pipe if you trust it",
              file=sys.stderr)
        return 2
    try:
        s = collect(args.shards, args.min_set, args.resolution, args.allow_pipe, args.max_image_pixels,
                    args.min_image_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"jedi-data: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2)) if args.json else _print(s)
    if s["sets"] == 0:
        print(f"jedi-data: no usable set in {s['shards']} shard(s); skipped: {s['skipped'] or 'nothing readable'}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

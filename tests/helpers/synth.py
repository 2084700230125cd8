"""jedi-synth test helpers: the composed config, raw shard samples, procedural view sets."""
from __future__ import annotations

import tarfile

import numpy as np
from hydra import compose, initialize_config_dir

from data_pipelines.synth import cli
from data_pipelines.synth import procedural as P


def synth_cfg(out_dir, *overrides):
    """conf/synth.yaml composed as jedi-synth would, writing to out_dir, without the progress bar."""
    with initialize_config_dir(str(cli.CONF_DIR), version_base="1.3"):
        return compose("synth", [f"out_dir={out_dir}", "progress=false", *overrides])


def read_samples(tar_path) -> list[dict]:
    """Raw samples of one shard, grouped by key (what the stream sees before decoding)."""
    samples = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    return list(samples.values())


def view_sets(seed: int, n: int = 4, res: int = 32):
    """A consistent set (one subject in n scenes) and a mixed one (a new subject per image) in the same
    scenes and poses, subjects drawn large (so colour-histogram and tiny CLIP embeddings can see them)."""
    rng = np.random.default_rng(seed)
    subject = P.sample_subject(rng)
    scenes = [P.SCENE_NAMES[i] for i in rng.choice(len(P.SCENE_NAMES), n, replace=False)]
    views = [dict(P.sample_view(rng, s), scale=0.42, cx=0.5, cy=0.5) for s in scenes]
    seeds = [int(x) for x in rng.integers(0, 2**31, n)]
    same = [P.render(subject, s, np.random.default_rng(k), res, view=v) for s, k, v in zip(scenes, seeds, views)]
    mixed = [P.render(P.sample_subject(rng), s, np.random.default_rng(k), res, view=v)
             for s, k, v in zip(scenes, seeds, views)]
    return same, mixed

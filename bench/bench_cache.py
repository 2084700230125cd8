"""Training step time with cached latents + text embeddings (jedi-data encode) vs encoding on the fly.

Same run, same batch of sets, tiny SD model with a VAE (32 px, latents 16x16) and a tiny CLIP text
encoder, CPU: objective + backward + AdamW. The cached batch comes from shards written by
`jedi-data encode`; the on-the-fly batch holds the same sets. Ratio = on-the-fly time / cached time.
"""
import os
import tempfile

import numpy as np
import torch
import webdataset as wds

from bench.timing import objective_step, seconds_per_call
from data_pipelines.schema import encode_set
from data_pipelines.stats import main as jedi_data
from jedi_train.training.datamodule import JeDiDataModule
from jedi_train.models.components import load_components
from jedi_train.models.objective import JeDiObjective
from jedi_train.models.tiny import create_tiny_model_dir

SETS, STEPS = 8, 20


def _write_sets(out_dir: str) -> None:
    os.makedirs(out_dir)
    rng = np.random.default_rng(0)
    for shard in range(2):
        with wds.TarWriter(f"{out_dir}/s-{shard}.tar") as w:
            for i in range(SETS):
                images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
                w.write(encode_set(f"s{shard}_{i}", images, [f"a photo of subject {i} view {j}" for j in range(3)],
                                   ext="png"))


def _batch(model_dir, c, src):
    dm = JeDiDataModule(f"{src}/*.tar", resolution=32, batch_size=SETS, num_workers=0, shardshuffle=False,
                        crop="center", min_set=3, max_set=3, tokenizer=c.text.tokenizers)
    dm.cache_model = (model_dir, c)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def _steps_per_s(objective, params, batch) -> float:
    return 1 / seconds_per_call(objective_step(objective, torch.optim.AdamW(params, lr=1e-4), batch), STEPS)


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        model_dir = create_tiny_model_dir(f"{d}/tiny_vae", resolution=32, with_vae=True)
        _write_sets(f"{d}/sets")
        assert jedi_data(["encode", f"{d}/sets/*.tar", f"{d}/cached", "--model", model_dir, "--no-progress"]) == 0
        c = load_components(model_dir)
        objective, params = JeDiObjective(c), list(c.unet.parameters())
        fly, cached = _batch(model_dir, c, f"{d}/sets"), _batch(model_dir, c, f"{d}/cached")
        runs = [(_steps_per_s(objective, params, fly), _steps_per_s(objective, params, cached)) for _ in range(2)]
    f = sum(r[0] for r in runs) / 2  # twice, interleaved: load drift on a shared machine
    k = sum(r[1] for r in runs) / 2
    vae = sum(p.numel() for p in c.vae.parameters()) / 1e6
    text = sum(p.numel() for p in c.text_encoder.parameters()) / 1e6
    unet = sum(p.numel() for p in params) / 1e6
    print(f"{SETS} sets x 3 images, 32 px, tiny SD with VAE ({vae:.2f} M) + CLIP ({text:.2f} M), UNet {unet:.2f} M, CPU")
    print(f"{'':12} {'steps/s':>8} {'images/s':>9}")
    print(f"{'on the fly':12} {f:8.2f} {f * SETS * 3:9.1f}")
    print(f"{'cached':12} {k:8.2f} {k * SETS * 3:9.1f}")
    print(f"step time on the fly / cached = {k / f:.2f}x")


if __name__ == "__main__":
    main()

"""Cached latents + text embeddings (issue 15, part 2): `jedi-data encode` writes them beside the sets, the
stream and the objective use them when they were made by the trained model's encoders."""
from __future__ import annotations

import csv
import json
import os
import tarfile

import pytest
import torch
from helpers.cli import run_jedi
from helpers.stream_helpers import write_shards

from jedi_train.cli.data import main as jedi_data
from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.objective import JeDiObjective, ObjectiveConfig
from jedi_train.training import encode
from jedi_train.training.datamodule import JeDiDataModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards x 4 sets of 2..5 images (the sets a batch pads)."""
    return write_shards(str(tmp_path_factory.mktemp("sets")), 4, 4)


def shard_dir(shards) -> str:
    return os.path.dirname(shards[0])


def encoded(model_dir: str, src: str, out: str, *extra: str) -> str:
    assert jedi_data(["encode", f"{src}/*.tar", out, "--model", model_dir, "--no-progress", *extra]) == 0
    return out


def first_batch(model_dir, components, src, **kw):
    dm = JeDiDataModule(f"{src}/*.tar", resolution=components.resolution, batch_size=4, num_workers=0,
                        shardshuffle=False, tokenizer=components.text.tokenizers, text_layout=components.text.layout,
                        **{"crop": "center", "min_set": 2, "max_set": 4, **kw})
    dm.cache_model = (model_dir, components)
    dm.setup()
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(("fixture", "dtype", "tol"), [("tiny_model_dir", "float16", 2e-3),  # pixel fold codec
                                                        ("tiny_vae_model_dir", "float16", 2e-3),
                                                        ("tiny_vae_model_dir", "bfloat16", 2e-2),
                                                        ("tiny_sdxl_model_dir", "float16", 2e-3),
                                                        ("tiny_flux_model_dir", "float16", 2e-3),
                                                        ("tiny_flux2_model_dir", "float16", 2e-3)])
def test_cached_and_on_the_fly_batches_give_the_same_loss(fixture, dtype, tol, shards, tmp_path, request):
    model_dir = request.getfixturevalue(fixture)
    c = load_components(model_dir, JeDiConfig(resolution=32))
    out = encoded(model_dir, shard_dir(shards), str(tmp_path / "cached"), "--dtype", dtype, "--resolution", "32")
    fly, cached = first_batch(model_dir, c, shard_dir(shards)), first_batch(model_dir, c, out)
    assert "latent_mean" not in fly and cached["set_id"] == fly["set_id"]
    assert not cached["valid"].all()  # padded sets: padding rows must not change the loss either
    assert cached["latent_mean"].dtype == getattr(torch, dtype)
    assert ("latent_logvar" in cached) == (c.vae is not None)  # a VAE posterior; pixels are deterministic
    # every TextEmbeddings field of the layout is cached: SDXL pooled + time ids, FLUX pooled (CLIP) + T5 states
    fields = {"tiny_model_dir": {"hidden"}, "tiny_vae_model_dir": {"hidden"}, "tiny_sdxl_model_dir": {"hidden", "pooled", "time_ids"},
              "tiny_flux_model_dir": {"hidden", "pooled"}, "tiny_flux2_model_dir": {"hidden"}}[fixture]
    assert {k.removeprefix("text_") for k in cached if k.startswith("text_") and "empty" not in k} == fields
    assert {k.removeprefix("text_empty_") for k in cached if k.startswith("text_empty_")} == fields
    objective = JeDiObjective(c, ObjectiveConfig(caption_dropout=0.5, reference_dropout=0.3))
    want = [float(objective(fly, generator=torch.Generator().manual_seed(s))["loss"].detach()) for s in range(3)]
    for frozen in (c.vae, c.text_encoder, c.text_encoder_2):  # the cached batch must not need the encoders
        if frozen is not None:
            frozen.forward = frozen.encode = None
    got = [float(objective(cached, generator=torch.Generator().manual_seed(s))["loss"].detach()) for s in range(3)]
    assert got == pytest.approx(want, rel=tol)
    assert len(set(want)) == 3  # the seeds drew different noise / dropout: the comparison is not trivial


def test_a_cache_from_another_model_is_refused_in_one_line(tiny_vae_model_dir, tiny_model_dir, shards, tmp_path):
    out = encoded(tiny_vae_model_dir, shard_dir(shards), str(tmp_path / "cached"))
    other = load_components(tiny_model_dir)
    with pytest.raises(ValueError) as e:
        first_batch(tiny_model_dir, other, out)
    msg = str(e.value)
    assert "\n" not in msg and tiny_vae_model_dir in msg and tiny_model_dir in msg
    assert "jedi-data encode" in msg and "data.use_cache=false" in msg
    batch = first_batch(tiny_model_dir, other, out, use_cache=False)  # the fix it names works
    assert "latent_mean" not in batch and batch["pixel_values"].shape[-1] == 32


def test_random_crop_or_flip_with_a_cache_is_refused(tiny_vae_model_dir, shards, tmp_path):
    c = load_components(tiny_vae_model_dir)
    out = encoded(tiny_vae_model_dir, shard_dir(shards), str(tmp_path / "cached"))
    for bad in ({"crop": "random"}, {"flip_prob": 0.5}):
        with pytest.raises(ValueError, match="centre crop.*set data.crop=center data.flip_prob=0, or "
                                             "data.use_cache=false"):
            first_batch(tiny_vae_model_dir, c, out, **bad)
    assert "latent_mean" in first_batch(tiny_vae_model_dir, c, out)


def members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isreg()}


def test_interrupted_encode_resumes_without_redoing_complete_shards(tiny_vae_model_dir, shards, tmp_path,
                                                                   monkeypatch, capsys):
    out, real, calls = tmp_path / "cached", encode.encode_set, []

    def dies_in_the_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(encode, "encode_set", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        jedi_data(["encode", f"{shard_dir(shards)}/*.tar", str(out), "--model", tiny_vae_model_dir, "--no-progress"])
    assert sorted(p.name for p in out.glob("*.tar")) == ["sets-000000.tar"]  # the half shard is not published
    first = (out / "sets-000000.tar").stat()
    monkeypatch.setattr(encode, "encode_set", real)
    capsys.readouterr()
    encoded(tiny_vae_model_dir, shard_dir(shards), str(out))
    line = capsys.readouterr().out
    assert "3 shard(s) written, 1 already complete" in line and line.count("\n") == 1
    assert (out / "sets-000000.tar").stat().st_mtime_ns == first.st_mtime_ns  # not rewritten
    assert not list(out.glob(".*.partial"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sets"] == 16 and manifest["fingerprint"]["id"]
    # every input member travels unchanged; each set gains its three cache members
    for src, dst in zip(shards, sorted(out.glob("*.tar"))):
        a, b = members(src), members(str(dst))
        assert all(b[k] == v for k, v in a.items())
        added = {k.split(".", 1)[1] for k in set(b) - set(a)}
        assert added == {"cache.json", "latents.safetensors", "text.safetensors"}
    # a rerun into the same dir with another model is refused, before anything is written
    assert jedi_data(["encode", f"{shard_dir(shards)}/*.tar", str(out), "--model", tiny_vae_model_dir,
                      "--dtype", "bfloat16", "--no-progress"]) == 2
    assert "different config" in capsys.readouterr().err


def test_shards_split_over_processes(tiny_vae_model_dir, shards, tmp_path, monkeypatch):
    out = str(tmp_path / "cached")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    encoded(tiny_vae_model_dir, shard_dir(shards), out)
    assert sorted(p for p in os.listdir(out) if p.endswith(".tar")) == ["sets-000001.tar", "sets-000003.tar"]
    assert not json.loads((tmp_path / "cached" / "manifest.json").read_text())["complete"]
    encoded(tiny_vae_model_dir, shard_dir(shards), out, "--num-shards", "2", "--shard-index", "0")
    assert json.loads((tmp_path / "cached" / "manifest.json").read_text())["complete"]


def loss_rows(run_dir) -> list[float]:
    with open(run_dir / "loss_curve.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_jedi_train_on_cached_shards(tiny_vae_model_dir, tiny_model_dir, shards, tmp_path):
    """SD layout end to end: jedi-data encode, then jedi-train with the text encoders dropped (so every batch
    must come from the cache) reaches the losses of the on-the-fly run; another model's run is refused."""
    out = tmp_path / "cached"
    p = run_jedi("jedi-data", "encode", f"{shard_dir(shards)}/*.tar", str(out), "--model", tiny_vae_model_dir,
                 root=tmp_path)
    assert "4 shard(s) written" in p.stdout
    args = ["experiment=demo", f"model.model_dir={tiny_vae_model_dir}", "data.synthesize_if_missing=null",
            "data.heldout_sources=null", "data.heldout_synthesize_if_missing=null", "data.crop=center",
            "data.min_set=2", "data.max_set=4", "data.batch_size=4", "data.num_workers=1", "trainer.max_steps=3",
            "export_after_fit=false", "~callbacks.sample_grid", "~callbacks.identity_gain", "logger=none",
            "callbacks.loss_curve.every_n_steps=1", "trainer.log_every_n_steps=1", "model.lr_scheduler.num_warmup_steps=0"]
    run_jedi("jedi-train", *args, f"data.sources='{out}/*.tar'", "data.drop_text_encoders=true",
             f"paths.output_dir={tmp_path / 'cached_run'}", root=tmp_path)
    run_jedi("jedi-train", *args, f"data.sources='{shard_dir(shards)}/*.tar'", f"paths.output_dir={tmp_path / 'fly_run'}",
             root=tmp_path)
    cached, fly = loss_rows(tmp_path / "cached_run"), loss_rows(tmp_path / "fly_run")
    assert len(cached) == len(fly) == 3 and cached == pytest.approx(fly, rel=5e-3)
    bad = run_jedi("jedi-train", *args, f"model.model_dir={tiny_model_dir}", f"data.sources='{out}/*.tar'",
                   f"paths.output_dir={tmp_path / 'bad_run'}", root=tmp_path, check=False)
    assert bad.returncode != 0
    err = [line for line in bad.stderr.splitlines() if "re-encode" in line]
    assert len(err) == 1 and "data.use_cache=false" in err[0] and tiny_model_dir in err[0]


def test_cache_members_round_trip_in_the_schema():
    from data_pipelines.schema import cache_info, decode_cache, encode_cache

    mean, hidden = torch.randn(3, 4, 2, 2), torch.randn(3, 5, 8)
    sample = {"__key__": "x", **encode_cache({"fingerprint": "f"}, {"mean": mean, "logvar": None},
                                             {"hidden": hidden, "pooled": None}, torch.float32)}
    assert cache_info(sample) == {"fingerprint": "f"}
    got = decode_cache(sample, [2, 0])
    assert set(got) == {"latent_mean", "text_hidden"}
    assert torch.equal(got["latent_mean"], mean[[2, 0]]) and torch.equal(got["text_hidden"], hidden[[2, 0]])
    assert cache_info({k: v for k, v in sample.items() if k != "text.safetensors"}) is None


def test_uncached_sources_are_encoded_on_the_fly_unless_the_text_encoders_are_dropped(tiny_vae_model_dir, shards,
                                                                                       tmp_path):
    c = load_components(tiny_vae_model_dir)
    out = encoded(tiny_vae_model_dir, shard_dir(shards), str(tmp_path / "cached"))

    def datamodule(**kw):
        dm = JeDiDataModule([f"{out}/*.tar", f"{shard_dir(shards)}/*.tar"], resolution=32, batch_size=4,
                            num_workers=0, crop="center", tokenizer=c.text.tokenizers, **kw)
        dm.cache_model = (tiny_vae_model_dir, c)
        return dm

    dm = datamodule(shuffle_buffer=4)
    dm.setup()
    assert dm.cfg.cache_fingerprint and c.text_encoder is not None
    objective = JeDiObjective(c)
    batches = list(dm.train_dataloader())
    cached = [b for b in batches if "latent_mean" in b]
    assert 0 < len(cached) < len(batches)  # a batch with an uncached set is encoded on the fly as a whole
    assert all(torch.isfinite(objective(b)["loss"]) for b in batches)
    with pytest.raises(ValueError, match=f"drop_text_encoders=true but .*{shard_dir(shards)}.* holds no cached"):
        datamodule(drop_text_encoders=True).setup()

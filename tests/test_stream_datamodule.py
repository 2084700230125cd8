"""JeDiDataModule: the batch contract the objective consumes, Lightning checkpoint -> exact data
resume (through Lightning's own one-batch prefetch), state format across ranks, Hydra config."""
import glob
import os

import lightning as L
import pytest
import torch
from helpers.stream_helpers import write_shards
from lightning.pytorch.callbacks import ModelCheckpoint

from jedi_train.training.datamodule import JeDiDataModule, build_datamodule
from jedi_train.models.components import tokenize
from jedi_train.models.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dm_shards"))
    write_shards(d, num_shards=4, sets_per_shard=5, set_sizes=(2, 3, 4, 5), size=24)
    return os.path.join(d, "*.tar")


def make_dm(shards, tokenizer, **kw):
    args = {"sources": shards, "resolution": 16, "batch_size": 4, "num_workers": 2, "shuffle_buffer": 4, "seed": 3}
    return JeDiDataModule(**{**args, **kw}, tokenizer=tokenizer)


def test_batch_contract(shards, tokenizer):
    dm = make_dm(shards, tokenizer, max_set=5)
    dm.setup("fit")
    empty = tokenize(tokenizer, [""])[0]
    for batch in dm.train_dataloader():
        dm.on_before_batch_transfer(batch, 0)
        assert "_stream" not in batch
        px, ids, ref, valid = batch["pixel_values"], batch["input_ids"], batch["is_ref"], batch["valid"]
        b, n = valid.shape
        assert px.dtype == torch.float32 and px.shape == (b, n, 3, 16, 16)
        assert px.min() >= -1 and px.max() <= 1
        assert ids.dtype == torch.int64 and ids.shape == (b, n, tokenizer.model_max_length)
        assert ref.dtype == valid.dtype == torch.bool
        assert n == int(valid.sum(1).max())                      # N = the largest set in the batch
        assert ((valid & ~ref).sum(1) >= 1).all()                # every set keeps a target
        assert not (ref & ~valid).any()                          # padding is never a reference
        assert (px[~valid] == 0).all() and (ids[~valid] == empty).all()
        assert len(batch["set_id"]) == b
        assert [len(c) for c in batch["captions"]] == valid.sum(1).tolist()
        for i, caps in enumerate(batch["captions"]):
            assert torch.equal(ids[i, : len(caps)], tokenize(tokenizer, caps))
    assert dm.loader.state.batches == len(dm.train_dataloader()) == 20 // 4


def test_reference_count_distribution_is_configurable_and_never_all(shards, tokenizer):
    dm = make_dm(shards, tokenizer, ref_count_probs=[0, 0, 0, 0, 1], min_set=2, max_set=5)  # "always 4 refs"
    dm.setup("fit")
    for batch in dm.train_dataloader():
        sizes, refs = batch["valid"].sum(1), batch["is_ref"].sum(1)
        assert torch.equal(refs, (sizes - 1).clamp(max=4))  # capped at n - 1


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((tuple(batch["set_id"]), float(batch["pixel_values"].sum())))
        return self.w * batch["pixel_values"].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, root, max_steps, ckpt_path=None):
    module = Recorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        callbacks=[ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=1,
                                                   save_top_k=-1, filename="{step}")])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


def test_lightning_checkpoint_resumes_the_data_exactly(shards, tokenizer, tmp_path):
    # 5 steps per epoch: resume mid-epoch (after step 3) and at the epoch boundary (after step 5)
    full = fit(make_dm(shards, tokenizer), str(tmp_path / "full"), max_steps=8)
    assert len(full) == 8 and len({s for s, _ in full}) == 8
    for step in (3, 5):
        ckpt = glob.glob(str(tmp_path / "full" / "ckpt" / f"step={step}*.ckpt"))[0]
        state = torch.load(ckpt, weights_only=False)["JeDiDataModule"]
        assert set(state) == {"version", "world_size", "num_workers", "batch_size", "ranks"}
        assert state["ranks"][0]["batches"] == (step - 1) % 5 + 1  # consumed, not prefetched
        resumed = fit(make_dm(shards, tokenizer), str(tmp_path / f"resumed{step}"), max_steps=8, ckpt_path=ckpt)
        assert resumed == full[step:]


def test_state_for_another_layout_restarts_the_epoch(shards, tokenizer, caplog):
    dm = make_dm(shards, tokenizer)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(2):
        dm.on_before_batch_transfer(next(it), 0)
    next(it)  # fetched ahead (as a prefetching loop does) but never given to the model: not consumed
    it.close()
    state = dm.state_dict()
    assert state["ranks"][0]["batches"] == 2 and state["world_size"] == 1
    other = make_dm(shards, tokenizer, num_workers=1)
    other.load_state_dict(state)
    other.setup("fit")
    assert "resuming at the start of epoch 0" in caplog.text
    assert other.loader.state.batches == 0 and other.loader.state.cursors == {}
    two_ranks = make_dm(shards, tokenizer, rank=1, world_size=2)
    two_ranks.setup("fit")
    assert two_ranks.state_dict()["ranks"].keys() == {1}


def test_hydra_data_config_builds_the_datamodule(shards, tiny_model_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from jedi_train.train import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"data.sources=['{shards}']", "data.batch_size=2"])
    with open_dict(cfg):
        cfg.paths.root_dir = "/nonexistent"
    dm = build_datamodule(cfg.data, None, resolution=16, seed=1, model_dir=tiny_model_dir, synthesize_if_missing=None)
    assert dm.cfg.resolution == 16 and dm.cfg.seed == 1 and dm.cfg.batch_size == 2
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].dtype == torch.int64


def test_heldout_batch_and_missing_data_messages(shards, tokenizer, tmp_path):
    dm = make_dm(shards, tokenizer, heldout_sources=shards)
    held = dm.heldout_batch(3)
    assert held["set_id"] == ["s0_0", "s0_1", "s0_2"] and "_stream" not in held  # stream order, fixed
    assert dm.heldout_batch(3) is held and make_dm(shards, tokenizer).heldout_batch(3) is None
    missing = make_dm(str(tmp_path / "nothing-*.tar"), tokenizer, synthesize_if_missing=None)
    missing.prepare_data()
    with pytest.raises(FileNotFoundError, match="matches no shards"):
        missing.setup("fit")
    with pytest.raises(ValueError, match="tokenizer object or model_dir"):
        make_dm(shards, None).setup("fit")


def test_module_logs_data_counters_on_logging_steps(tiny_model_dir, tmp_path):
    """JeDiModule logs data/skipped_* / data/repaired_* (gathered only on steps that reach the logger)."""
    import csv

    from helpers.stream_helpers import encode_image, set_json, write_raw_tar
    from lightning.pytorch.loggers import CSVLogger
    from PIL import Image

    from jedi_train.training.module import JeDiModule

    members = {}
    for i in range(8):  # sets of grayscale PNGs: every image is repaired to RGB, and counted
        members[f"g{i}.json"] = set_json(f"g{i}", 2)
        for j in range(2):
            members[f"g{i}.{j}.png"] = encode_image(Image.new("L", (32, 32), 30 * j + i))
    write_raw_tar(str(tmp_path / "gray-0000.tar"), members)
    module = JeDiModule(model_dir=tiny_model_dir, ema={"enabled": False})
    dm = JeDiDataModule(sources=str(tmp_path / "gray-*.tar"), resolution=32, batch_size=2, num_workers=0,
                        model_dir=tiny_model_dir, ref_count_probs=[0.0, 1.0])
    gathers = []
    dm.global_counts = lambda real=dm.global_counts: gathers.append(1) or real()
    logger = CSVLogger(str(tmp_path), name="log")
    L.Trainer(max_steps=4, accelerator="cpu", logger=logger, log_every_n_steps=2, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(module, datamodule=dm)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("data/repaired_image_mode_L")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # the logging steps
    assert len(gathers) == 2  # the (collective) gather ran on those steps only, not on all 4
    assert [float(r["data/repaired_image_mode_L"]) for r in rows] == [8.0, 16.0]  # 2 sets x 2 images per step

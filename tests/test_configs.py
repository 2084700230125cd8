"""Every combination of config groups composes, resolves, and names importable targets."""
import itertools
from pathlib import Path

import pytest
from helpers.cli import compose_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, get_method
from omegaconf import OmegaConf

from jedi_train.train import CONF_DIR


def _options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


def _importable(target):
    if target.startswith("helpers.deepspeed_cpu."):
        return
    try:
        get_class(target)
    except Exception:  # noqa: BLE001 -- not a class: then it must be a function
        get_method(target)


COMBOS = list(itertools.product(_options("model"), _options("trainer"), _options("strategy"), _options("logger")))


@pytest.mark.parametrize("model,trainer,strategy,logger", COMBOS)
def test_every_group_combination_composes(model, trainer, strategy, logger, tmp_path):
    cfg = compose_train([f"model={model}", f"trainer={trainer}", f"strategy={strategy}", f"logger={logger}"],
                        tmp_path)
    assert cfg.model._target_ == "jedi_train.training.module.JeDiModule"
    assert cfg.data.resolution == cfg.model.resolution
    for t in set(_targets(OmegaConf.to_container(cfg))):
        _importable(t)


@pytest.mark.parametrize("experiment", [None] + _options("experiment"))
@pytest.mark.parametrize("debug", [None] + _options("debug"))
def test_experiments_and_debug_compose(experiment, debug, tmp_path):
    overrides = [f"experiment={experiment}"] if experiment else []
    overrides += [f"debug={debug}"] if debug else []
    cfg = compose_train(overrides, tmp_path)
    assert cfg.trainer.max_steps > 0
    if debug == "fast":
        assert cfg.trainer.max_steps <= 10 and not cfg.logger


def test_optuna_search_composes(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna", "experiment=demo"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert "model.optimizer.lr" in cfg.hydra.sweeper.params
    get_class(cfg.hydra.sweeper._target_)


def test_unknown_keys_and_groups_are_rejected(tmp_path):
    with pytest.raises(Exception, match="model.learning_rat"):
        compose_train(["model.learning_rat=1"], tmp_path)
    with pytest.raises(Exception, match="strategy"):
        compose_train(["strategy=zero9"], tmp_path)


def test_experiment_values_override_the_top_level_defaults(tmp_path):
    base = compose_train([], tmp_path)
    demo = compose_train(["experiment=demo"], tmp_path)
    assert base.export_after_fit is False and demo.export_after_fit is True
    assert demo.run_name.startswith("demo-") and not base.run_name.startswith("demo-")
    assert compose_train(["experiment=demo", "export_after_fit=false"], tmp_path).export_after_fit is False


def test_gpu_trainer_reads_the_node_count_from_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "4")
    cfg = compose_train(["trainer=gpu"], tmp_path)
    assert cfg.trainer.num_nodes == 4 and isinstance(cfg.trainer.num_nodes, int)


@pytest.mark.parametrize("argv,expected", [
    (["experiment=demo", "trainer.nonexistent=3"], "+trainer.nonexistent=3"),  # names the fix
    (["model=nope"], ("available: flux, flux2, flux2_klein, qwenimage, sd15, sd21, sd3, sdxl, tiny_flux, tiny_flux2, "
                      "tiny_flux2_klein, tiny_pixel, tiny_qwenimage, tiny_sd3, tiny_sdxl")),
    (["strategy=ddp,single"], "add -m"),
    (["-m", "strategy=ddp,sin"], "strategy/sin"),  # every value of a sweep is checked, not just the first
    (["-m", "model=tiny_pixel", "data.batch_size=2,4", "model.lr_x=1e-4,1e-3"], "model.lr_x"),
])
def test_bad_overrides_are_reported_in_one_line(argv, expected):
    from jedi_common.hydra_args import config_error

    error = config_error(CONF_DIR, "train", argv)
    assert error is not None and expected in error and "\n" not in error


def test_good_overrides_and_sweeps_pass_the_check():
    from jedi_common.hydra_args import config_error

    assert config_error(CONF_DIR, "train", ["experiment=demo", "trainer.max_steps=5"]) is None
    assert config_error(CONF_DIR, "train", ["-m", "hparams_search=optuna", "experiment=demo", "strategy=single,ddp"]) is None
    assert config_error(CONF_DIR, "synth", ["generator=procedural", "num_sets=4", "out_dir=/tmp/x"]) is None
    assert config_error(CONF_DIR, "train", ["-cn", "my_train", "whatever.key=1"]) is None  # another config: Hydra's


def test_callbacks_are_one_config_each_and_compose_as_a_list(tmp_path):
    """conf/callbacks/: default.yaml lists one file per callback; a list picks some; ~ drops one."""
    import hydra

    names = {p.stem for p in (Path(CONF_DIR) / "callbacks").glob("*.yaml")} - {"default"}
    cfg = compose_train([], tmp_path)
    assert set(cfg.callbacks) == names
    picked = compose_train(["callbacks=[model_checkpoint,loss_curve]"], tmp_path)
    assert list(picked.callbacks) == ["model_checkpoint", "loss_curve"]
    assert "sample_grid" not in compose_train(["~callbacks.sample_grid"], tmp_path).callbacks
    cb = hydra.utils.instantiate(picked.callbacks.loss_curve)
    assert type(cb).__name__ == "LossCurveCallback" and cb.out_dir == picked.paths.output_dir


def test_optimizer_group_swaps_the_partial_config(tmp_path):
    cfg = compose_train(["model=sdxl", "model/optimizer=adamw8bit"], tmp_path)
    assert cfg.model.optimizer._target_ == "jedi_train.training.module.adamw_8bit" and cfg.model.optimizer._partial_
    assert cfg.model.optimizer.lr == 5e-6  # the model's lr stays over the group's default
    assert cfg.model.lr_scheduler.num_warmup_steps == 1000


def test_proof_gpu_is_the_proof_at_64px_with_its_own_model_and_shards(tmp_path):
    demo, gpu = compose_train(["experiment=proof"], tmp_path), compose_train(["experiment=proof_gpu"], tmp_path)
    assert (gpu.model.resolution, gpu.data.resolution, gpu.model.create_tiny_if_missing.resolution) == (64, 64, 64)
    assert gpu.trainer.accelerator == "gpu" and gpu.model.objective.snr_weighting == "v"
    assert gpu.model.model_dir != demo.model.model_dir  # a 32 px tiny model is never reused at 64 px
    assert gpu.data.sources[0].url != demo.data.sources[0].url
    assert gpu.data.synthesize_if_missing.out_dir != demo.data.synthesize_if_missing.out_dir
    assert gpu.data.min_set == gpu.data.max_set == 3 and gpu.sampling.image_guidance == demo.sampling.image_guidance

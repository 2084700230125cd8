import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BASE model in the SD directory layout (pixel space, 32 px)."""
    from jedi_train.models.tiny import create_tiny_model_dir

    return create_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_sd")), resolution=32, pixel_fold=2)


@pytest.fixture(scope="session")
def tiny_vae_model_dir(tmp_path_factory):
    """The same, with a tiny VAE (latent-space model, like SD)."""
    from jedi_train.models.tiny import create_tiny_model_dir

    return create_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_sd_vae")), resolution=32, with_vae=True)


def tiny_model_from_config(model: str, out_dir: str) -> str:
    """The tiny model `model=<model>` creates on first use (its create_tiny_if_missing), written to out_dir."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from jedi_train.models.tiny import create_tiny_model_dir
    from jedi_train.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    return create_tiny_model_dir(out_dir, **OmegaConf.to_container(cfg.model.create_tiny_if_missing, resolve=True))


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory):
    """The tiny SDXL of conf/model/tiny_sdxl.yaml: two text encoders, pooled text + time ids, a tiny VAE."""
    return tiny_model_from_config("tiny_sdxl", str(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="session")
def tiny_flux_model_dir(tmp_path_factory):
    """The tiny FLUX.1 of conf/model/tiny_flux.yaml: CLIP + T5, a 16-channel VAE, an MM-DiT with guidance embedding."""
    return tiny_model_from_config("tiny_flux", str(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(scope="session")
def tiny_sd3_model_dir(tmp_path_factory):
    """The tiny SD3 of conf/model/tiny_sd3.yaml: CLIP-L + CLIP-G + T5, a 16-channel VAE, an MM-DiT (SD3.5's dual attention)."""
    return tiny_model_from_config("tiny_sd3", str(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: two threads on a shared 2-core machine mostly spin (measured 2-5x slower).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pipe_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model exported as a pipeline with the demo's settings for the reference KV cache
    (reference_attention 'references', references at t = 0), as jedi-export writes it."""
    from jedi_train.models.components import load_components
    from jedi_train.models.joint import JeDiConfig
    from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

    c = load_components(tiny_model_dir, JeDiConfig(reference_attention="references"))
    out = str(tmp_path_factory.mktemp("exported") / "pipeline")
    JeDiPipeline.from_components(c).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture
def eval_cli(capsys):
    """jedi-eval's main in-process: eval_cli(subcommand, *argv) -> (rc, stdout, stderr)."""
    from jedi_train.cli.eval import main

    def call(bench, *argv):
        capsys.readouterr()
        try:
            rc = main([bench, *map(str, argv)])
        except SystemExit as e:  # argparse
            rc = e.code
        out = capsys.readouterr()
        return rc, out.out, out.err
    return call

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BASE model in the SD directory layout (pixel space, 32 px)."""
    from jedi_train.model.components import create_tiny_model_dir

    return create_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_sd")), resolution=32, pixel_fold=2)


@pytest.fixture(scope="session")
def tiny_vae_model_dir(tmp_path_factory):
    """The same, with a tiny VAE (latent-space model, like SD)."""
    from jedi_train.model.components import create_tiny_model_dir

    return create_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_sd_vae")), resolution=32, with_vae=True)

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


@pytest.fixture(scope="session")
def tiny_flux2_klein_model_dir(tmp_path_factory):
    """The tiny FLUX.2 Klein of conf/model/tiny_flux2_klein.yaml: a 27-layer Qwen3, AutoencoderKLFlux2, no guidance."""
    return tiny_model_from_config("tiny_flux2_klein", str(tmp_path_factory.mktemp("tiny_flux2_klein")))


@pytest.fixture(scope="session")
def tiny_flux2_model_dir(tmp_path_factory):
    """The tiny FLUX.2-dev of conf/model/tiny_flux2.yaml: a 30-layer Mistral-3 + PixtralProcessor, guidance embedding."""
    return tiny_model_from_config("tiny_flux2", str(tmp_path_factory.mktemp("tiny_flux2")))


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
    from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

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


@pytest.fixture(scope="session")
def extractor_dirs(tmp_path_factory):
    """A tiny random ViT (+ ViTImageProcessor) and CLIPModel (+ tokenizer, CLIPImageProcessor), saved."""
    from jedi_train.models.tiny import create_tiny_extractor_dirs

    return create_tiny_extractor_dirs(str(tmp_path_factory.mktemp("extractors")))


@pytest.fixture(scope="session")
def fake_bench(tmp_path_factory):
    """A 2-subject bench in DreamBench's format (3 templates per list), for tests that need no real photos."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("bench")
    tmpl = "prompt_list = [\n" + "".join(f"'a {{0}} {{1}} {w}'.format(unique_token, class_token),\n"
                                         for w in ("{X}", "in the snow", "on the beach")) + "]\n"
    (root / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\nbox,box\npup,dog\nabsent,toy\n\nPrompts\n\nObject Prompts\n\n"
        + tmpl.replace("{X}", "on a table") + "\nLive Subject Prompts\n\n" + tmpl.replace("{X}", "wearing a hat"))
    for s in ("box", "pup"):
        (root / s).mkdir()
        for i in range(3):
            arr = np.random.default_rng(i).integers(0, 256, (40, 48, 3), np.uint8)
            Image.fromarray(arr).save(root / s / f"{i:02d}.jpg")
    return str(root)

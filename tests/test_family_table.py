"""The family table is where family knowledge lives: a fifth family (a renamed copy of the SD row with its own
recognition rule and tiny recipe, registered here and nowhere else) trains, exports, samples and is evaluated
through the documented entry points; unknown families get one line listing the supported ones."""
import json
import os

import pytest
from helpers.cli import FAST, compose_train

from jedi_train.models import families
from jedi_train.models.tiny import create_tiny_unet_dir

pytestmark = pytest.mark.usefixtures("one_thread")
MARK = "toy_family"  # what the toy family's recipe writes into unet/config.json, and its row recognises


def create_toy_dir(out_dir, family, **spec):
    """The toy family's tiny recipe: an SD-layout model whose UNet config carries the toy mark."""
    create_tiny_unet_dir(out_dir, family=family, **spec)
    path = os.path.join(out_dir, "unet", "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, MARK: True}, f)
    return out_dir


@pytest.fixture
def toy_family():
    sd = families.get("sd")
    toy = families.renamed(sd, name="toy", title="Toy UNet family", tiny_recipe=f"{__name__}:create_toy_dir",
                           matches=lambda config: config.get(MARK) is True, dry_run_presets={})
    families.register(toy, before="sd")  # narrower than the SD row: recognised first
    try:
        yield toy
    finally:
        families.unregister("toy")
    assert "toy" not in families.FAMILIES


def test_a_fifth_family_trains_exports_samples_and_evaluates(toy_family, tmp_path, eval_cli):
    from jedi_train.cli import sample
    from jedi_train.models.components import check_model_dir
    from jedi_train.train import train
    from jedi_train.training.checkpoints import safe_load

    model_dir = tmp_path / "toy_model"
    cfg = compose_train([*FAST, "debug=fast", "trainer.max_steps=2", f"model.model_dir={model_dir}",
                         "+model.create_tiny_if_missing.family=toy", "callbacks.identity_gain.num_sets=2",
                         "callbacks.identity_gain.train_num_sets=2"], tmp_path)
    result = train(cfg)
    assert check_model_dir(str(model_dir)) == "toy"  # created by the row's recipe, recognised by the row's rule
    ckpt = safe_load(os.path.join(result["output_dir"], "checkpoints", "last.ckpt"))
    assert ckpt["family"] == "toy" and result["global_step"] == 2
    pipe_dir = result["pipeline_dir"]

    out = tmp_path / "samples"
    ref = os.path.join(tmp_path, "ref.png")
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(ref)
    assert sample.main([pipe_dir, "--ref", ref, "--prompt", "a photo of a mug", "--num", "1", "--steps", "2",
                        "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "00_00.png").is_file()

    rc, _, err = eval_cli("procedural", pipe_dir, "--out", tmp_path / "eval", "--subjects", 2, "--refs", "0,1",
                          "--image-guidance", "0,2", "--samples", 1, "--steps", 2)
    assert rc == 0, err
    with open(tmp_path / "eval" / "summary.json") as f:
        assert len(json.load(f)["rows"]) == 3

    # a checkpoint of the toy family is refused against an SD directory, naming both families
    from jedi_train.export.to_pipeline import export_checkpoint
    from jedi_train.models.tiny import create_tiny_model_dir

    sd_dir = create_tiny_model_dir(str(tmp_path / "sd"), resolution=32, pixel_fold=4,
                                   unet_kwargs={"block_out_channels": [64, 128], "attention_levels": 2, "heads": 4})
    with pytest.raises(ValueError, match="is a Toy UNet family checkpoint but the model directory holds a "
                                         "Stable Diffusion 1.x/2.x model"):
        export_checkpoint(os.path.join(result["output_dir"], "checkpoints", "last.ckpt"), str(tmp_path / "x"),
                          model_dir=sd_dir)


def test_unknown_families_are_one_line_listing_the_supported_ones(tmp_path):
    from jedi_train.models.tiny import create_tiny_model_dir

    for call in (lambda: families.get("sd4"), lambda: create_tiny_model_dir(str(tmp_path / "m"), family="sd4")):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "'sd4' is unknown" in msg
        assert all(f.title in msg for f in families.FAMILIES.values())
    assert not (tmp_path / "m").exists()


def test_the_table_answers_what_the_tree_used_to_guess():
    """Each row's folders, text layout and classes are what the loaders, the dry run and the pipelines read."""
    sd3, flux, sdxl = families.get("sd3"), families.get("flux"), families.get("sdxl")
    assert sd3.required == ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                            "text_encoder_3", "tokenizer_3", "scheduler")
    assert sdxl.tokenizers == ("tokenizer", "tokenizer_2") and flux.text_layout == "flux" and not flux.fixed_resolution
    for row in families.FAMILIES.values():
        assert row.joint().__name__ in row.denoiser_classes
        assert row.pipeline().denoiser_name == row.denoiser_folder
        assert callable(row.lora().lora_state_dict)
    assert families.family_of_config("unet", {"addition_embed_type": "text_time"}) is sdxl
    assert families.family_of_config("transformer", {"_class_name": "PixArtTransformer2DModel"}) is None

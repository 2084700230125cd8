"""`jedi-train ... dry_run=true`: the model built on the meta device (no weights) from the published SD 1.5,
FLUX.1-dev and SD3.5-medium shapes or from a model directory's configs; counts match the architecture, bytes follow the strategy."""
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import zygote
from helpers.cli import compose_train

from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.training.dry_run import activation_bytes, estimate

SD15_UNET, CLIP_L, SD_VAE = 859_520_964, 123_060_480, 83_653_863  # published parameter counts
FLUX_DEV, T5_XXL, FLUX_VAE = 11_901_408_320, 4_762_310_656, 83_819_683
CLIP_L_PROJ, CLIP_G_PROJ = 123_650_304, 694_659_840  # SD3's / SDXL's CLIP text encoders with projection


def test_sd15_counts_without_weights(tmp_path):
    e = estimate(compose_train(["model=sd15", "model.model_dir=/nowhere", "strategy=ddp", "trainer.devices=4"], tmp_path))
    assert e["trained"] == SD15_UNET + (9 - 4) * 320 * 3 * 3  # + the widened conv_in's new input channels
    assert e["frozen_parts"] == CLIP_L + SD_VAE and e["frozen_base"] == 0
    assert e["per_rank"]["AdamW states (fp32)"] == 8 * e["trained"]  # DDP: replicated


def test_flux_counts_lora_and_zero_sharding(tmp_path):
    full = estimate(compose_train(["experiment=flux_s3", "model.model_dir=/nowhere", "trainer.devices=8"], tmp_path))
    assert full["trained"] == FLUX_DEV + (4 * 33 - 64) * 3072  # + x_embedder's reference | mask features
    assert full["frozen_parts"] == CLIP_L + T5_XXL + FLUX_VAE
    assert full["stage"] == 3 and full["per_rank"]["trained weights (fp32)"] == 4 * full["trained"] / 8
    assert full["per_rank"]["EMA copy (fp32)"] == 4 * full["trained"] / 8  # ZeRO-3: each rank its slice
    zero2 = estimate(compose_train(["experiment=flux_s3", "model.model_dir=/nowhere", "trainer.devices=8",
                                    "strategy=deepspeed_zero2"], tmp_path))
    assert zero2["per_rank"]["EMA copy (fp32)"] == 4 * full["trained"]  # whole on every rank
    lora = estimate(compose_train(["experiment=flux_s3", "model.model_dir=/nowhere", "trainer.devices=8",
                                   "model.lora.rank=16", "strategy=deepspeed_zero2"], tmp_path))
    assert lora["trained"] + lora["frozen_base"] > full["trained"] and lora["trained"] < 0.01 * full["trained"]
    assert lora["per_rank"]["AdamW states (fp32)"] == 8 * lora["trained"] / 8  # ZeRO-2 shards the optimizer
    low = estimate(compose_train(["experiment=flux_s3", "model.model_dir=/nowhere", "trainer.devices=8",
                                  "model.lora.rank=16", "strategy=deepspeed_zero2", "model.lora.base_dtype=float8_e4m3fn",
                                  "model/optimizer=adamw8bit"], tmp_path))
    base = low["per_rank"]["frozen base of the denoiser (float8_e4m3fn)"]
    assert low["frozen_base"] <= base < 0.3 * lora["per_rank"]["frozen base of the denoiser (float32)"]  # ~1 byte each
    assert low["per_rank"]["AdamW states (8-bit)"] == 2 * low["trained"] / 8


def test_sd3_counts_its_three_text_encoders_and_the_widened_patch_embedding(tmp_path):
    from diffusers import SD3Transformer2DModel

    from jedi_train.models.families import dry_run_preset

    e = estimate(compose_train(["experiment=sd3_s3", "model.model_dir=/nowhere", "trainer.devices=8"], tmp_path))
    with torch.device("meta"):
        base = sum(p.numel() for p in SD3Transformer2DModel(**dry_run_preset("sd35_medium")[1]["denoiser"]).parameters())
    assert e["family"] == "sd3" and e["denoiser"] == "JointSD3Transformer2DModel"
    assert e["trained"] == base + (33 - 16) * 1536 * 2 * 2  # + pos_embed.proj's reference | mask input channels
    assert e["frozen_parts"] == CLIP_L_PROJ + CLIP_G_PROJ + T5_XXL + FLUX_VAE  # SD3's VAE is FLUX's shape
    assert e["batch"]["resolution"] == 1024 and e["stage"] == 3


@pytest.mark.parametrize(("model", "fixture"), [("tiny_flux", "tiny_flux_model_dir"), ("tiny_sd3", "tiny_sd3_model_dir")])
def test_a_model_directory_is_read_from_its_configs(model, fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    e = estimate(compose_train(["experiment=demo", f"model={model}", f"model.model_dir={model_dir}"], tmp_path))
    c = load_components(model_dir, JeDiConfig(resolution=32))
    assert e["trained"] == sum(p.numel() for p in c.denoiser.parameters())
    encoders = [m for k, m in c.text_parts().items() if k.startswith("text_encoder") and m is not None]
    assert e["frozen_parts"] == sum(p.numel() for m in (*encoders, c.vae) for p in m.parameters())


def test_cli_prints_the_table_and_trains_nothing(tmp_path):
    exe = Path(sys.executable).parent / "jedi-train"
    p = zygote.run([str(exe), "experiment=flux_s3", "dry_run=true", "model.model_dir=/nowhere",
                    f"paths.output_dir={tmp_path}/run"], env=os.environ, cwd=os.getcwd(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "JointFluxTransformer2DModel (flux), ZeRO-3" in p.stdout and "total" in p.stdout
    assert "activations (estimate)" in p.stdout and "1 sets x 3 images at 512 px, bfloat16" in p.stdout
    # ZeRO-3 over 8 ranks shards the EMA (44.3 GiB whole) with the weights; ZeRO-2 keeps it whole on each rank
    assert "EMA copy (fp32)                               5.54 GiB" in p.stdout and "note: the EMA" not in p.stdout
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()
    bad = zygote.run([str(exe), "experiment=demo", "dry_run=true", "model.model_dir=/nowhere"], env=os.environ,
                     cwd=os.getcwd(), timeout=300)
    assert bad.returncode == 2 and "names no embedded one" in bad.stderr


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_models_without_a_preset_need_their_directory(name, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no model and model.architecture=None"):
        estimate(compose_train([f"model={name}", "model.model_dir=/nowhere"], tmp_path))


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_sdxl_model_dir", "tiny_flux_model_dir", "tiny_sd3_model_dir"])
def test_activation_trace_on_meta_matches_real_tensors(fixture, request):
    """The meta-device trace counts what the same forward on real CPU tensors keeps for the backward (SDPA's
    meta trace models the fused kernels CPU and CUDA pick), grows linearly with the sets in the batch, and
    shrinks under gradient checkpointing."""
    c = load_components(request.getfixturevalue(fixture), JeDiConfig(resolution=32))
    down = c.codec.downsample
    real = activation_bytes(c.denoiser, 2, 3, 32, down, 16)
    double = activation_bytes(c.denoiser, 4, 3, 32, down, 16)
    checkpointed = activation_bytes(c.denoiser, 2, 3, 32, down, 16, gradient_checkpointing=True)
    meta = activation_bytes(c.denoiser.to("meta"), 2, 3, 32, down, 16)
    assert real > 0 and 0 <= (meta - real) / real < 0.06  # meta copies a few reshapes CPU aliases: a little high
    assert 1.9 < double / real < 2.1  # linear in the sets of the batch
    assert checkpointed < 0.5 * real


def test_the_estimate_follows_batch_precision_and_checkpointing(tmp_path):
    def act(*overrides):
        return estimate(compose_train(["model=sd15", "model.model_dir=/nowhere", *overrides], tmp_path))

    base = act("data.batch_size=2", "data.max_set=3", "model.gradient_checkpointing=false", "trainer.precision=32-true")
    assert base["batch"] == {"sets": 2, "set_size": 3, "resolution": 512, "dtype": "float32",
                             "gradient_checkpointing": False}
    assert base["per_rank"]["activations (estimate)"] == base["activations"] > 2**30  # SD 1.5, 6 images at 512 px
    bf16 = act("data.batch_size=2", "data.max_set=3", "model.gradient_checkpointing=false", "trainer.precision=bf16-mixed")
    assert 0.4 < bf16["activations"] / base["activations"] < 0.6
    more = act("data.batch_size=4", "data.max_set=3", "model.gradient_checkpointing=false", "trainer.precision=32-true")
    assert 1.8 < more["activations"] / base["activations"] < 2.2
    ckpt = act("data.batch_size=2", "data.max_set=3", "model.gradient_checkpointing=true", "trainer.precision=32-true")
    assert ckpt["activations"] < 0.5 * base["activations"]

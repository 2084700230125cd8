"""JeDiConfig: JeDi's settings set once (make_joint), saved with the model, read back whole."""
import json
import os
import warnings

import pytest
import torch

from jedi_train.training.encode import frozen_encoders
from jedi_train.models.components import load_components, load_denoiser
from jedi_train.models.joint import JeDiConfig, infer_pixel_fold
from jedi_train.models.joint_unet import JointUNet2DConditionModel
from jedi_train.pipelines.pipeline_jedi import JeDiPipeline


def test_from_dict_reads_hparams_and_saved_settings_and_refuses_unknown_values():
    hp = {"model_dir": "x", "conditioning": "replacement", "resolution": None, "lr": 1e-4}
    cfg = JeDiConfig.from_dict(hp)  # a run's flat hyper-parameters: other keys ignored, None -> default
    assert cfg.conditioning == "replacement" and cfg.resolution is None and cfg.reference_attention == "set"
    assert JeDiConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="reference_attention='targets' is unknown"):
        JeDiConfig(reference_attention="targets")
    with pytest.raises(ValueError, match="reference_positions='shifted' is unknown"):
        JeDiConfig.from_dict({"reference_positions": "shifted"})


def test_pixel_fold_is_inferred_only_from_pixel_channel_counts():
    assert [infer_pixel_fold(c) for c in (3, 12, 48, 4, 16)] == [1, 2, 4, 1, 1]


def test_make_joint_stores_the_whole_config_in_one_step(tiny_model_dir, tmp_path):
    unet = JointUNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.make_joint(JeDiConfig(conditioning="replacement", reference_attention="references"))
    saved = unet.config["_jedi"]
    assert saved["conditioning"] == "replacement" and saved["reference_attention"] == "references"
    assert saved["pixel_fold"] == 2 and saved["latent_channels"] == 12  # 12 = 3 x 2^2 channels: folded pixels
    assert all(not p.references_see_targets for n, p in unet.attn_processors.items() if n.endswith("attn1.processor"))
    unet.save_pretrained(tmp_path / "unet")
    again = JointUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert again.jedi == unet.jedi
    assert all(not p.references_see_targets for n, p in again.attn_processors.items() if n.endswith("attn1.processor"))


def test_a_saved_joint_model_keeps_its_settings_but_takes_the_reference_attention_rule(tiny_model_dir, tmp_path):
    c = load_components(tiny_model_dir, JeDiConfig(conditioning="replacement", reference_timestep="target"))
    out = str(tmp_path / "pipe")
    JeDiPipeline.from_components(c).save_pretrained(out)
    kept = load_denoiser(out)  # no config: exactly as saved
    assert kept.jedi == c.unet.jedi
    with pytest.warns(UserWarning, match=r"made with conditioning='replacement' \(asked 'channels'\).* saved settings "
                                         "are kept"):
        switched = load_denoiser(out, JeDiConfig(reference_attention="references"))
    assert switched.jedi.reference_attention == "references"
    assert switched.jedi.conditioning == "replacement" and switched.jedi.reference_timestep == "target"  # weights' own
    assert switched.config.in_channels == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # settings that match: silent
        load_denoiser(out, JeDiConfig(conditioning="replacement", reference_timestep="target"))


def test_settings_saved_before_all_fields_existed_load_with_the_defaults(tiny_model_dir, tmp_path):
    out = str(tmp_path / "pipe")
    JeDiPipeline.from_components(load_components(tiny_model_dir)).save_pretrained(out)
    path = os.path.join(out, "unet", "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["_jedi"] = {"conditioning": "channels", "reference_timestep": "zero", "pixel_fold": 2, "latent_channels": 12}
    with open(path, "w") as f:
        json.dump(cfg, f)
    pipe = JeDiPipeline.from_pretrained(out)
    assert pipe.denoiser.jedi.reference_attention == "set" and pipe.codec.fold == 2
    assert torch.isfinite(pipe.denoiser.conv_in.weight).all()


def test_encoding_a_joint_pixel_model_uses_the_fold_it_recorded(tiny_model_dir, tmp_path):
    """jedi-data encode --model on a trained (joint, widened input) pixel model: its in_channels (2C+1) imply
    no fold, the saved settings do."""
    out = str(tmp_path / "pipe")
    JeDiPipeline.from_components(load_components(tiny_model_dir)).save_pretrained(out)
    codec, _, resolution = frozen_encoders(out)
    base_codec, _, _ = frozen_encoders(tiny_model_dir)
    assert codec.fold == base_codec.fold == 2 and resolution == 32

"""Identity measurement and recipe levers: the subject-pixel gain, subject loss weight, reference caption
dropout, high-timestep sampling, zero terminal SNR + trailing sampling."""
import pytest
import torch
from helpers.batches import set_batch

from jedi_train.models.components import load_components, tokenize
from jedi_train.models.objective import Dropout, JeDiObjective, ObjectiveConfig, identity_gain, latent_mask
from jedi_train.pipelines.pipeline_jedi import JeDiPipeline


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    c = load_components(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # make the reference channels matter (a fresh widened conv_in ignores them)
        c.unet.conv_in.weight.normal_(0, 0.05)
    return c


def _batch(c, b=4, n=3, seed=0):
    ids = tokenize(c.tokenizer, ["a photo of a mug on the beach"] * (b * n)).view(b, n, -1)
    mask = torch.zeros(b, n, 1, 32, 32)
    mask[..., 8:20, 10:24] = 1
    return {**set_batch(ids, b, n, 32, seed), "subject_mask": mask}


def test_identity_gain_is_the_subject_pixel_error_ratio(components):
    obj = JeDiObjective(components)
    batch = _batch(components)
    r = identity_gain(obj, batch, timesteps=(700,), seeds=(3,))
    assert r["n_sets"] == 4 and r["per_set"].shape == (4,) and r["se"] > 0
    # by hand: same noise and t, references visible vs hidden, error on target subject pixels only
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(12, 12, 16, 16, generator=g)
    t = torch.full((4,), 700)
    no_cap = torch.zeros(4, 3, dtype=torch.bool)
    errs = [obj(batch, noise=noise, timesteps=t, dropout=Dropout(no_cap, torch.full((4,), h)),
                return_error=True)["error"] for h in (False, True)]
    m = latent_mask(batch["subject_mask"].flatten(0, 1), (16, 16))
    tgt = (~batch["is_ref"]).flatten().float()
    seen, hidden = [((e * m).sum((1, 2, 3)) * tgt).view(4, 3).sum(1) for e in errs]
    assert torch.allclose(r["per_set"], 1 - seen / hidden, atol=1e-5)
    assert abs(r["gain"]) > 1e-5  # a model whose targets see the references: the two passes differ
    with pytest.raises(ValueError, match="subject masks"):
        identity_gain(obj, {k: v for k, v in batch.items() if k != "subject_mask"})
    no_ref = {**batch, "is_ref": torch.zeros(4, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="at least one reference"):
        identity_gain(obj, no_ref)


def test_subject_loss_weight(components):
    batch = _batch(components)
    noise, t = torch.randn(12, 12, 16, 16), torch.tensor([100, 300, 500, 900])
    drop = Dropout(torch.zeros(4, 3, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
    plain = JeDiObjective(components)(batch, noise=noise, timesteps=t, dropout=drop, return_error=True)
    weighted = JeDiObjective(components, ObjectiveConfig(subject_loss_weight=5.0))(
        batch, noise=noise, timesteps=t, dropout=drop)
    m = latent_mask(batch["subject_mask"].flatten(0, 1), (16, 16))
    expect = (plain["error"] * (1 + 4 * m)).mean((1, 2, 3))[(~batch["is_ref"]).flatten()].mean()
    assert torch.allclose(weighted["loss"], expect, atol=1e-6) and weighted["loss"] > plain["loss"]


def test_reference_caption_dropout_and_high_timesteps(components):
    is_ref = torch.zeros(64, 3, dtype=torch.bool)
    is_ref[:, 0] = True
    valid = torch.ones_like(is_ref)
    g = torch.Generator().manual_seed(0)
    only_refs = JeDiObjective(components, ObjectiveConfig(caption_dropout=0.0, reference_caption_dropout=1.0))
    d = only_refs.sample_dropout(is_ref, valid, g)
    assert d.caption[:, 0].all() and not d.caption[:, 1:].any()
    same = JeDiObjective(components, ObjectiveConfig(caption_dropout=0.5)).sample_dropout(is_ref, valid, g)
    assert 0.3 < same.caption[:, 0].float().mean() < 0.7  # default: references dropped at the caption rate
    high = JeDiObjective(components, ObjectiveConfig(high_timestep_prob=1.0, high_timestep_min=600))
    assert (high.sample_timesteps(500, "cpu", g) >= 600).all()
    mixed = JeDiObjective(components, ObjectiveConfig(high_timestep_prob=0.5, high_timestep_min=600))
    frac = (mixed.sample_timesteps(4000, "cpu", g) >= 600).float().mean()
    assert 0.65 < frac < 0.75  # 0.5 + 0.5 * 0.4


def test_zero_terminal_snr_and_trailing_sampling(tiny_model_dir):
    plain = load_components(tiny_model_dir)
    zsnr = load_components(tiny_model_dir, noise_schedule={"rescale_betas_zero_snr": True})
    assert plain.noise_scheduler.alphas_cumprod[-1] > 1e-3  # SD's schedule keeps signal at t = 999
    assert zsnr.noise_scheduler.alphas_cumprod[-1] < 1e-6
    pipe = JeDiPipeline.from_components(zsnr)
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(25)
    assert int(pipe.scheduler.timesteps[0]) == 999  # sampling starts from pure noise, not t = 960

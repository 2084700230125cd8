"""The training objective: references get no loss, dropout rates and effects, SNR weights, frozen parts."""
import pytest
import torch
from helpers.batches import set_batch

from jedi_train.models.components import load_components, tokenize
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.objective import Dropout, JeDiObjective, ObjectiveConfig

CAPTIONS = ["a photo of a mug on the beach", "a photo of a mug in the snow", "a photo of a mug on a table"]


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(tiny_model_dir)


def _batch(components, b=2, n=3, seed=0, res=32):
    ids = tokenize(components.tokenizer, CAPTIONS * b)[: b * n].view(b, n, -1)
    return set_batch(ids, b, n, res, seed)


def _no_dropout(batch):
    b, n = batch["is_ref"].shape
    return Dropout(torch.zeros(b, n, dtype=torch.bool), torch.zeros(b, dtype=torch.bool))


def test_loss_ignores_reference_noise(components):
    obj = JeDiObjective(components)
    batch = _batch(components)
    noise = torch.randn(6, 12, 16, 16)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        a = obj(batch, noise=noise, timesteps=t, dropout=_no_dropout(batch))["loss"]
        noise2 = noise.clone()
        noise2[[0, 3]] = torch.randn(2, 12, 16, 16)  # the references' noise
        b = obj(batch, noise=noise2, timesteps=t, dropout=_no_dropout(batch))["loss"]
        noise3 = noise.clone()
        noise3[1] = torch.randn(12, 16, 16)  # a target's noise
        c = obj(batch, noise=noise3, timesteps=t, dropout=_no_dropout(batch))["loss"]
    assert torch.equal(a, b)
    assert (a - c).abs() > 1e-4


def test_references_get_no_gradient_from_their_prediction(tiny_model_dir):
    comps = load_components(tiny_model_dir, JeDiConfig(reference_timestep="target"))  # refs noised too: the hard case
    obj = JeDiObjective(comps)
    batch = _batch(comps)
    seen = {}
    handle = comps.denoiser.register_forward_hook(lambda m, i, o: seen.setdefault("pred", o.sample) .retain_grad())
    out = obj(batch, dropout=_no_dropout(batch))
    out["loss"].backward()
    handle.remove()
    grad = seen["pred"].grad.abs().sum(dim=(1, 2, 3))
    assert (grad[[0, 3]] == 0).all() and (grad[[1, 2, 4, 5]] > 0).all()
    assert out["num_targets"] == 4


def test_dropout_rates_are_honoured(components):
    obj = JeDiObjective(components, ObjectiveConfig(caption_dropout=0.3, reference_dropout=0.2))
    b, n = 4000, 4
    is_ref = torch.zeros(b, n, dtype=torch.bool)
    is_ref[:, :2] = True
    is_ref[: b // 2, :] = False  # half the sets have no references: nothing to drop there
    is_ref[: b // 2, 0] = False
    valid = torch.ones(b, n, dtype=torch.bool)
    d = obj.sample_dropout(is_ref, valid, torch.Generator().manual_seed(0))
    targets = valid & ~is_ref
    assert abs(d.caption[targets].float().mean().item() - 0.3) < 0.02
    # reference captions: at the caption rate by default (uncaptioned user photos in distribution), or their own
    assert abs(d.caption[is_ref].float().mean().item() - 0.3) < 0.03
    own = JeDiObjective(components, ObjectiveConfig(caption_dropout=0.3, reference_caption_dropout=0.0))
    assert not own.sample_dropout(is_ref, valid, torch.Generator().manual_seed(0)).caption[is_ref].any()
    with_refs = is_ref.any(1)
    assert abs(d.reference[with_refs].float().mean().item() - 0.2) < 0.03
    assert not d.reference[~with_refs].any()


def test_dropped_conditions_have_no_effect(components):
    obj = JeDiObjective(components)
    batch = _batch(components)
    other = dict(batch, pixel_values=batch["pixel_values"].clone(), input_ids=batch["input_ids"].clone())
    other["pixel_values"][:, 0] = torch.rand_like(other["pixel_values"][:, 0])  # other references
    other["input_ids"][:, 1:] = tokenize(components.tokenizer, ["a dog"])[0]  # other target captions
    noise, t = torch.randn(6, 12, 16, 16), torch.tensor([400, 900])
    drop_all = Dropout(~batch["is_ref"], torch.ones(2, dtype=torch.bool))
    with torch.no_grad():
        kw = {"noise": noise, "timesteps": t}
        assert torch.equal(obj(batch, dropout=drop_all, **kw)["loss"], obj(other, dropout=drop_all, **kw)["loss"])
        keep = _no_dropout(batch)
        assert obj(batch, dropout=keep, **kw)["loss"] != obj(other, dropout=keep, **kw)["loss"]


def test_min_snr_weighting(components):
    from diffusers.training_utils import compute_snr

    obj = JeDiObjective(components, ObjectiveConfig(snr_gamma=5.0))
    t = torch.tensor([1, 500, 999])
    snr = compute_snr(components.noise_scheduler, t)
    want = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)  # v-prediction form
    assert torch.allclose(obj.loss_weights(t), want)
    assert JeDiObjective(components).loss_weights(t) is None


def test_latent_model_trains_only_the_unet(tiny_vae_model_dir):
    comps = load_components(tiny_vae_model_dir)
    obj = JeDiObjective(comps)
    out = obj(_batch(comps))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert comps.denoiser.conv_in.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in comps.vae.parameters())
    assert all(p.grad is None for p in comps.text_encoder.parameters())


def test_bad_batches_raise(components):
    obj = JeDiObjective(components)
    batch = _batch(components)
    with pytest.raises(ValueError, match="no target"):
        obj(dict(batch, is_ref=torch.ones(2, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="do not match"):
        obj(dict(batch, is_ref=torch.zeros(2, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="sets, set_size"):
        obj(dict(batch, pixel_values=batch["pixel_values"].flatten(0, 1)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_each_parameterisation_has_zero_loss_at_its_own_target(tiny_model_dir, prediction_type):
    """A UNet that outputs exactly its parameterisation's target scores 0; the other two targets do not."""
    from types import SimpleNamespace

    comps = load_components(tiny_model_dir, prediction_type=prediction_type)
    obj = JeDiObjective(comps)
    batch = _batch(comps)
    noise = torch.randn(6, 12, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300, 900])
    t_img = t.repeat_interleave(3)
    latents = comps.codec.encode(batch["pixel_values"].flatten(0, 1))
    targets = {"epsilon": noise, "sample": latents,
               "v_prediction": comps.noise_scheduler.get_velocity(latents, noise, t_img)}
    assert torch.equal(obj.target(latents, noise, t_img), targets[prediction_type])
    for name, pred in targets.items():  # the UNet's forward replaced by a fixed prediction
        comps.denoiser.forward = lambda *a, pred=pred, **k: SimpleNamespace(sample=pred)
        loss = obj(batch, noise=noise, timesteps=t, dropout=_no_dropout(batch))["loss"].item()
        assert loss == 0 if name == prediction_type else loss > 1e-3, (name, loss)
    del comps.denoiser.forward

def test_min_snr_weighting_for_sample_prediction(tiny_model_dir):
    from diffusers.training_utils import compute_snr

    comps = load_components(tiny_model_dir, prediction_type="sample")
    t = torch.tensor([1, 500, 999])
    snr = compute_snr(comps.noise_scheduler, t)
    assert torch.allclose(JeDiObjective(comps, ObjectiveConfig(snr_gamma=5.0)).loss_weights(t),
                          torch.minimum(snr, torch.tensor(5.0)))  # x0 space: min(snr, gamma)


def test_v_weighting_of_an_x0_prediction_is_its_v_loss(tiny_model_dir):
    """snr_weighting="v": an x0 prediction's weighted error equals the v-space error of the same prediction
    (unclipped with a large gamma), and gamma caps the low-noise weight while high noise keeps ~1."""
    from diffusers.training_utils import compute_snr

    comps = load_components(tiny_model_dir, prediction_type="sample")
    sched = comps.noise_scheduler
    t = torch.tensor([20, 300, 900])
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x0_hat = x0 + 0.1 * torch.randn(3, 4, 8, 8)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    v_hat = a * (x_t - a * x0_hat) / s - s * x0_hat  # the v an x0 prediction implies
    v_err = ((v_hat - sched.get_velocity(x0, noise, t)) ** 2).mean(dim=(1, 2, 3))
    x0_err = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    weights = JeDiObjective(comps, ObjectiveConfig(snr_gamma=1e9, snr_weighting="v")).loss_weights(t)
    assert torch.allclose(x0_err * weights, v_err, rtol=1e-3)
    capped = JeDiObjective(comps, ObjectiveConfig(snr_gamma=5.0, snr_weighting="v")).loss_weights(t)
    snr = compute_snr(sched, t)
    assert capped[0] == 5.0 and torch.allclose(capped[2], snr[2] + 1) and 1 < float(capped[2]) < 1.1
    with pytest.raises(ValueError, match="snr_weighting"):
        JeDiObjective(comps, ObjectiveConfig(snr_weighting="x"))


def test_flow_matching_weights_are_the_same_x0_space_recipe(tiny_flux_model_dir):
    """On a flow-matching family the weights mean what they mean on DDPM: the flow error times the weight equals
    the x0 error (x0 = x_t - sigma * velocity) times min(1 + snr, gamma), snr = ((1 - sigma) / sigma)^2. So
    experiment=demo's recipe composes with model=tiny_flux (it used to be refused)."""
    comps = load_components(tiny_flux_model_dir)
    obj = JeDiObjective(comps, ObjectiveConfig(snr_gamma=5.0, snr_weighting="v"))
    assert obj.prediction_type == "flow"
    t = torch.tensor([30.0, 500.0, 950.0])
    sigma = t / 1000
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    v_hat = noise - x0 + 0.1 * torch.randn(3, 4, 8, 8)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    flow_err = ((v_hat - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    x0_err = ((x_t - sigma.view(-1, 1, 1, 1) * v_hat - x0) ** 2).mean(dim=(1, 2, 3))
    snr = ((1 - sigma) / sigma) ** 2
    want = x0_err * torch.clamp(snr + 1, max=5.0)
    assert torch.allclose(flow_err * obj.loss_weights(t), want, rtol=1e-4)

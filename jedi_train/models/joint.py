"""What every joint denoiser shares: its JeDi settings (`JeDiConfig`) and `JointDenoiserMixin`.

`JeDiConfig` is set once, when a base model is made joint (`make_joint(config)`), stored in the model's
config under ``_jedi`` (a private key diffusers keeps without warnings, so save_pretrained / from_pretrained
restore it) and read everywhere as `model.jedi` -- as nanoGPT passes its one GPTConfig whole. The training
config spells the same fields flat under ``model.`` (model.conditioning=replacement, ...).

`JointDenoiserMixin` goes first in a joint model's bases (`JointUNet2DConditionModel`,
`JointFluxTransformer2DModel`); the family class says how its input widens and which processors it uses.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

CONDITIONING_MODES = ("channels", "replacement")
REFERENCE_TIMESTEPS = ("zero", "target")
REFERENCE_ATTENTION = ("set", "references")
REFERENCE_POSITIONS = ("same", "offset")


@dataclass(frozen=True)
class JeDiConfig:
    """JeDi's settings of a joint denoiser (docs/method.md explains each choice)."""

    conditioning: str = "channels"  # references as extra input channels [clean | mask], or 'replacement'
    reference_timestep: str = "zero"  # references enter clean (t = 0) or noised to the targets' timestep
    reference_attention: str = "set"  # reference queries see the whole set, or 'references' only (KV cache)
    reference_positions: str = "same"  # FLUX: references' rotary ids as the targets', or 'offset' (UNO)
    resolution: int | None = None  # FLUX: the pixel size it works at (a UNet's is sample_size x downsample)
    pixel_fold: int | None = None  # pixel-space UNets: the pixel-unshuffle factor (None: from in_channels)
    latent_channels: int | None = None  # channels of the image representation; make_joint records it

    def __post_init__(self):
        for name, allowed in (("conditioning", CONDITIONING_MODES), ("reference_timestep", REFERENCE_TIMESTEPS),
                              ("reference_attention", REFERENCE_ATTENTION),
                              ("reference_positions", REFERENCE_POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown; use one of {allowed}")

    @classmethod
    def from_dict(cls, d: dict | None) -> JeDiConfig:
        """From a saved ``_jedi`` dict or a run's flat model hyper-parameters (other keys are ignored; None
        values take the defaults, as a config's nulls do)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names and v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> JeDiConfig:
        return dataclasses.replace(self, **changes)


class JointDenoiserMixin:
    """Settings, conversion and input assembly of a joint denoiser. A family class provides
    `_widen_input(config) -> config` (input weights for 'channels' conditioning, family defaults) and
    `joint_processors()` (the processor map its attention layers get)."""

    joint_input_module: str  # the weights 'channels' conditioning widens (trained in full under LoRA)
    directory_hint: str  # what model.model_dir should be, for the loading errors

    @classmethod
    def load(cls, path: str, subfolder: str | None, jedi: JeDiConfig | None = None, **from_pretrained_kwargs):
        """Load from a diffusers directory: a base model is made joint with `jedi` (defaults when None), a
        joint one is restored as saved."""
        where = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isfile(os.path.join(where, "config.json")):
            why = "has no config.json" if os.path.isdir(where) else "does not exist"
            raise FileNotFoundError(f"{where} {why}; point model.model_dir at {cls.directory_hint}")
        model = cls.from_pretrained(path, subfolder=subfolder, **from_pretrained_kwargs)
        if model.jedi is None:
            model.make_joint(jedi)
        return model

    @classmethod
    def from_config(cls, config=None, **kwargs):
        model = super().from_config(config, **kwargs)
        out = model[0] if isinstance(model, tuple) else model
        if out.jedi is not None:  # a saved joint model: reinstall the processors
            out.set_attn_processor(out.joint_processors())
        return model

    @classmethod
    def adopt(cls, model):
        """A joint model's folder loaded as its plain diffusers class (exports name it that way, so generic
        diffusers loading needs no jedi_train) -> this joint class: same weights and config, plus the joint
        methods and processors. Anything else is returned unchanged."""
        if type(model) is cls.__bases__[-1] and model.config.get("_jedi") is not None:
            model.__class__ = cls  # adds methods only: no state to initialise
            model.set_attn_processor(model.joint_processors())
        return model

    @property
    def jedi(self) -> JeDiConfig | None:
        saved = self.config.get("_jedi")
        return None if saved is None else JeDiConfig.from_dict(saved)

    def set_jedi(self, config: JeDiConfig) -> None:
        """Store the settings in the model config (saved with it) and install the matching processors."""
        self.register_to_config(_jedi=config.to_dict())
        self.set_attn_processor(self.joint_processors())

    def make_joint(self, config: JeDiConfig | None = None):
        """Convert this base model in place. Outputs are unchanged for sets of one image without references."""
        if self.jedi is not None:
            raise ValueError(f"this {type(self).__name__} is already joint")
        self.set_jedi(self._widen_input(config or JeDiConfig()))
        return self

    def set_reference_attention(self, mode: str):
        """'set' | 'references'. Train with 'references' (and reference_timestep 'zero') to allow the
        reference key/value cache at sampling time."""
        if self.jedi is None:
            raise ValueError("set_reference_attention needs a joint model (make_joint / load_components first)")
        self.set_jedi(self.jedi.replace(reference_attention=mode))
        return self

    def image_tokens(self, h: int, w: int) -> int:
        """Tokens one image of an (h, w) latent grid becomes (flow matching's resolution-dependent shift reads
        it): one per cell unless the family packs patches itself."""
        return h * w

    def assemble_input(self, noisy: torch.Tensor, clean: torch.Tensor, ref_visible: torch.Tensor) -> torch.Tensor:
        """Denoiser input for a flat batch of B*N images: [noisy | clean * visible | mask] ('channels'), or
        noisy ('replacement'). noisy, clean: (B*N, C, h, w); ref_visible: (B*N,) bool, True where the image
        is a reference the targets may use."""
        if self.jedi is None:
            raise ValueError("call make_joint() (or load with load_components) before using the joint model")
        if self.jedi.conditioning == "replacement":
            return noisy
        m = ref_visible.to(noisy.dtype)[:, None, None, None]
        return torch.cat([noisy, clean * m, m.expand(-1, 1, *noisy.shape[2:])], dim=1)


def mismatched_weights(model: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """(names in `state` the model lacks or holds in another shape, names of the model `state` lacks): what
    loading a checkpoint, a resume and a LoRA file's full weights all check before they load."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    return bad, [k for k in own if k not in state]


def infer_pixel_fold(channels: int) -> int:
    """A pixel-space model folds 3 colours x fold^2 into its channels: the fold those channels imply (1 if none)."""
    fold = round((channels / 3) ** 0.5)
    return fold if 3 * fold * fold == channels else 1


def widen(old: torch.nn.Module, new_in: int, keep: int) -> torch.nn.Module:
    """A copy of a Conv2d / Linear input layer with `new_in` input features: the first `keep` are the old
    weights, the new ones zero (so the widened model starts equal to the base)."""
    if isinstance(old, torch.nn.Conv2d):
        new = torch.nn.Conv2d(new_in, old.out_channels, old.kernel_size, old.stride, old.padding,
                              device=old.weight.device, dtype=old.weight.dtype)
    else:
        new = torch.nn.Linear(new_in, old.out_features, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :keep] = old.weight
        new.bias.copy_(old.bias)
    return new

"""LoRA on the joint denoiser (peft, through diffusers' PeftAdapterMixin, which every family's model has).

- `add_lora(denoiser, settings)`: a LoRA adapter on the attention projections (coupled attn1 and the
  cross-attention attn2 alike); every base weight frozen; the joint-specific weights that the base never
  had (the widened conv_in under 'channels' conditioning) train in full next to the adapter.
- `trained_names(denoiser)`: what trains, hence what the EMA and a LoRA checkpoint hold.
- `lora_layers(denoiser)`: the adapter in diffusers' LoRA format plus those full weights, for
  `JeDiPipeline.save_lora_weights` (and back through `JeDiPipeline.load_lora_weights`).
- `fuse_lora(denoiser)`: adapter merged into the base weights and removed: a plain joint denoiser.
- `base_fingerprint(denoiser)`: LoRA checkpoints hold no base weights; this names the base they need.
- `store_base_in(denoiser, dtype)`: the frozen base kept in bf16 / fp16 / fp8, each layer's weight upcast when
  it is read; the adapter and fully trained weights stay fp32.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoraSettings:
    rank: int = 0                      # 0: no LoRA (the whole UNet trains, or model.trainable's part)
    alpha: float | None = None         # None: = rank (scale 1)
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0
    train_fully: list[str] | None = None  # module names trained in full; None: the joint-specific new ones
    base_dtype: str | None = None      # frozen base stored as bfloat16 | float16 | float8_e4m3fn (None: as loaded)

    @property
    def enabled(self) -> bool:
        return int(self.rank) > 0


def joint_specific_modules(denoiser) -> list[str]:
    """Weights the base model never had: the widened input layer under 'channels' conditioning (the UNet's
    conv_in, the FLUX transformer's x_embedder)."""
    return [denoiser.joint_input_module] if denoiser.jedi is not None and denoiser.jedi.conditioning == "channels" else []


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def add_lora(denoiser, settings: LoraSettings, seed: int = 0):
    """Install the adapter in place; afterwards only the adapter and `train_fully` modules require grad."""
    from peft import LoraConfig

    if int(settings.rank) < 0:
        raise ValueError(f"model.lora.rank={settings.rank} is negative; use 0 (off) or e.g. model.lora.rank=16")
    names = [n for n, _ in denoiser.named_modules()]
    targets = list(settings.target_modules or [])
    if not targets:
        raise ValueError("model.lora.target_modules is empty; use e.g. [to_q, to_k, to_v, to_out.0]")
    for t in targets:
        if not any(_matches(n, t) for n in names):
            raise ValueError(f"model.lora.target_modules entry {t!r} matches no module of the UNet; use module "
                             f"names such as {', '.join(DEFAULT_TARGETS)} (attention) or ff.net.2 (feed-forward)")
    full = joint_specific_modules(denoiser) if settings.train_fully is None else list(settings.train_fully)
    for m in full:
        if m not in names:
            raise ValueError(f"model.lora.train_fully entry {m!r} is not a module of the UNet; give module names "
                             "as in denoiser.named_modules(), e.g. conv_in")
    denoiser.requires_grad_(False)
    alpha = settings.alpha if settings.alpha is not None else settings.rank
    with torch.random.fork_rng(devices=[]):  # the same adapter init in every run of a seed, whatever ran before
        torch.manual_seed(seed)
        denoiser.add_adapter(LoraConfig(r=int(settings.rank), lora_alpha=float(alpha),
                                    lora_dropout=float(settings.dropout), init_lora_weights="gaussian",
                                    target_modules=targets))
    for m in full:
        denoiser.get_submodule(m).requires_grad_(True)
    return denoiser


def trained_names(denoiser) -> list[str]:
    return [n for n, p in denoiser.named_parameters() if p.requires_grad]


def trained_parameters(denoiser) -> list[torch.nn.Parameter]:
    return [p for p in denoiser.parameters() if p.requires_grad]


def has_lora(denoiser) -> bool:
    return bool(getattr(denoiser, "peft_config", None))


def full_weights(denoiser) -> dict[str, torch.Tensor]:
    """The trained non-adapter weights (names as in a plain UNet, without peft's base_layer)."""
    out = {}
    for name, p in denoiser.named_parameters():
        if p.requires_grad and "lora_" not in name:
            out[name.replace(".base_layer.", ".")] = p.detach()
    return out


def lora_layers(denoiser) -> tuple[dict[str, torch.Tensor], dict]:
    """(state, metadata) in diffusers' format: peft's adapter state + the full weights; metadata is the
    LoraConfig (rank, alpha, targets) that diffusers rebuilds the adapter from."""
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}
    state.update({k: v.contiguous() for k, v in full_weights(denoiser).items()})
    return state, denoiser.peft_config["default"].to_dict()


def fuse_lora(denoiser):
    """Merge the adapter into the base weights and drop peft's layers (diffusers' fuse_lora + unload_lora)."""
    denoiser.fuse_lora()
    denoiser.unload_lora()
    return denoiser


def base_fingerprint(denoiser) -> str:
    """Config + per-tensor sums of the frozen base weights: cheap, and different for another base."""
    h = hashlib.sha256(json.dumps({k: v for k, v in denoiser.config.items() if not k.startswith("_")},
                                  sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if not p.requires_grad and "lora_" not in name:
                h.update(name.encode())
                h.update(f"{p.double().sum().item():.6e}".encode())
    return h.hexdigest()[:16]


BASE_DTYPES = ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")


class _Upcast(torch.nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def store_base_in(denoiser, dtype_name: str) -> None:
    """Keep the frozen base's Linear / Conv weights in `dtype_name`, upcast to the trained weights' dtype each
    time a layer reads them (a torch parametrization: the upcast copy lives only as long as the forward and
    backward need it, so activations and gradients keep full precision). Norms, embeddings, biases, the
    adapter and fully trained modules are left as they are. Not diffusers' layerwise-casting hooks: they
    cast the parameter itself back after the forward, so the backward pass would meet the stored dtype."""
    from torch.nn.utils import parametrize

    if dtype_name not in BASE_DTYPES:
        raise ValueError(f"model.lora.base_dtype={dtype_name!r} is not supported; use one of {', '.join(BASE_DTYPES)} "
                         "(or null to keep the base as loaded)")
    trained = trained_parameters(denoiser)
    if not trained:
        raise ValueError("model.lora.base_dtype needs LoRA: set model.lora.rank > 0")
    storage, compute = getattr(torch, dtype_name), trained[0].dtype
    for name, module in list(denoiser.named_modules()):
        if "lora_" in name or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if module.weight.requires_grad or parametrize.is_parametrized(module, "weight"):
            continue
        parametrize.register_parametrization(module, "weight", _Upcast(compute), unsafe=True)
        stored = module.parametrizations.weight.original
        stored.data = stored.data.to(storage)

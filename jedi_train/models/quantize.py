"""Frozen text encoders in 8 bits (torchao weight-only quantization): `model.text_encoder_quantization`.

The text encoders only ever run forward, so their Linear weights can be stored in 8 bits and dequantised in
the matmul: T5-XXL (FLUX) goes from 9.5 GB in bf16 to ~4.8 GB. 'int8' (Int8WeightOnlyConfig) runs on CPU and
CUDA; 'float8' (Float8WeightOnlyConfig) needs a CUDA GPU with fp8 support. torchao is an optional extra
(`pip install 'jedi-train[quant]'`), imported only when configured. Embeddings, norms and the VAE stay at
`model.frozen_dtype`. (Cached text embeddings, `jedi-data encode` + `data.drop_text_encoders`, free them entirely.)
"""
from __future__ import annotations

import torch

MODES = ("int8", "float8")


def check_quantization(mode: str | None, device: torch.device | str | None = None) -> None:
    """One clear error for an unknown mode, a missing torchao, or float8 without CUDA."""
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"model.text_encoder_quantization={mode!r} is unknown; use one of {MODES} or null")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ValueError(f"model.text_encoder_quantization={mode} needs torchao: pip install 'jedi-train[quant]' "
                         "(or pip install torchao), or set model.text_encoder_quantization=null") from None
    if mode == "float8" and device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"model.text_encoder_quantization=float8 needs a CUDA GPU (fp8 kernels), this run is on "
                         f"{torch.device(device).type}; use int8 here (it runs on CPU too) or trainer=gpu")


def quantize_text_encoders(encoders, mode: str | None, device: torch.device | str | None = None) -> None:
    """Quantise the Linear weights of each (frozen) text encoder in place, on the device it already sits on."""
    check_quantization(mode, device)
    if mode is None:
        return
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
    for encoder in encoders:
        if encoder is not None and not getattr(encoder, "_jedi_quantized", False):
            quantize_(encoder, config)
            encoder._jedi_quantized = mode  # idempotent: a resumed fit or a second on_fit_start does nothing


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters as stored (a quantised weight counts its 8-bit data and scales)."""
    total = 0
    for p in module.parameters():
        if hasattr(p, "__tensor_flatten__"):  # a torchao tensor subclass: its inner tensors hold the bytes
            total += sum(getattr(p, n).untyped_storage().nbytes() for n in p.__tensor_flatten__()[0])
        else:
            total += p.untyped_storage().nbytes()
    return total

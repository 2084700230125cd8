"""LoRA vs full finetune of the same joint UNet: trained parameters, checkpoint bytes, optimizer-state bytes,
training step time; and the frozen base in bf16 / fp8 (model.lora.base_dtype) against fp32.

Same run, same batch, tiny SD-layout model with the demo's UNet widths scaled up (so the adapter is a
realistic fraction), CPU. The checkpoint is what JeDiModule.on_save_checkpoint keeps (LoRA: the trained
weights only), serialized with torch.save.
"""
import io
import tempfile

import torch

from bench.timing import objective_step, seconds_per_call
from jedi_train.models.tiny import create_tiny_model_dir
from jedi_train.training.module import JeDiModule

SETS, N, STEPS = 4, 3, 10
UNET = {"block_out_channels": [64, 128, 256], "cross_attention_dim": 128, "heads": 4}


def _batch(module):
    g = torch.Generator().manual_seed(0)
    is_ref = torch.zeros(SETS, N, dtype=torch.bool)
    is_ref[:, 0] = True
    ids = module.components.text.token_ids(["a photo of a mug on the beach"] * N)
    r = module.resolution
    return {"pixel_values": torch.rand(SETS, N, 3, r, r, generator=g) * 2 - 1,
            "input_ids": ids.expand(SETS, *ids.shape).clone(), "is_ref": is_ref,
            "valid": torch.ones(SETS, N, dtype=torch.bool)}


def measure(model_dir, lora: dict | None) -> dict:
    m = JeDiModule(model_dir=model_dir, lora=lora, ema={"enabled": False}, optimizer={"lr": 1e-4})
    params = [p for p in m.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = _batch(m)

    seconds = seconds_per_call(objective_step(m.objective, opt, batch), STEPS)
    ckpt = {"state_dict": {f"unet.{k}": v for k, v in m.unet.state_dict().items()}}
    m.on_save_checkpoint(ckpt)
    buf = io.BytesIO()
    torch.save({"state_dict": ckpt["state_dict"], "optimizer": opt.state_dict()}, buf)
    stored = sum(p.numel() * p.element_size() for p in m.unet.parameters())
    return {"trained": sum(p.numel() for p in params), "total": sum(p.numel() for p in m.unet.parameters()),
            "ckpt": buf.getbuffer().nbytes, "step": seconds, "weights": stored}


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        model_dir = create_tiny_model_dir(d + "/m", unet_kwargs=UNET)
        rows = {"full finetune": measure(model_dir, None),
                "LoRA rank 8": measure(model_dir, {"rank": 8}),
                "LoRA 8, base bf16": measure(model_dir, {"rank": 8, "base_dtype": "bfloat16"}),
                "LoRA 8, base fp8": measure(model_dir, {"rank": 8, "base_dtype": "float8_e4m3fn"})}
    full = rows["full finetune"]
    print(f"{SETS} sets x {N} images, 32 px, UNet {UNET['block_out_channels']}, CPU, {STEPS} steps")
    print(f"{'':20} {'trained':>10} {'of':>10} {'checkpoint':>11} {'UNet weights':>13} {'step ms':>8} {'vs full':>8}")
    for name, r in rows.items():
        print(f"{name:20} {r['trained']:10,} {r['total']:10,} {r['ckpt'] / 2**20:9.2f}MB {r['weights'] / 2**20:11.2f}MB "
              f"{1000 * r['step']:8.0f} {full['step'] / r['step']:7.2f}x")
    lora = rows["LoRA rank 8"]
    print(f"LoRA / full: trained parameters {lora['trained'] / full['trained']:.3f}, checkpoint "
          f"{lora['ckpt'] / full['ckpt']:.3f}; fp8 base / fp32 base: UNet weights "
          f"{rows['LoRA 8, base fp8']['weights'] / lora['weights']:.3f}")


if __name__ == "__main__":
    main()

"""LightningModule training throughput vs the bare core step (objective + AdamW), same batch, same run.

Goal: Lightning's overhead is small (ratio >= 0.9). Tiny pixel config, CPU, 8 sets x 3 images, 32 px.
"""
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from jedi_train.models.components import tokenize
from jedi_train.models.tiny import create_tiny_model_dir
from jedi_train.training.module import JeDiModule

SETS, N, STEPS = 8, 3, 30


class OneBatch(Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        return self.batch


def _batch(tokenizer):
    g = torch.Generator().manual_seed(0)
    is_ref = torch.zeros(SETS, N, dtype=torch.bool)
    is_ref[:, 0] = True
    return {"pixel_values": torch.rand(SETS, N, 3, 32, 32, generator=g) * 2 - 1,
            "input_ids": tokenize(tokenizer, ["a photo of a mug on the beach"] * N).expand(SETS, N, -1).clone(),
            "is_ref": is_ref, "valid": torch.ones(SETS, N, dtype=torch.bool)}


def bare(model_dir, batch):
    m = JeDiModule(model_dir=model_dir, optimizer={"lr": 1e-4}, ema={"enabled": True, "decay": 0.99})
    opt = torch.optim.AdamW(m.unet.parameters(), lr=1e-4)
    step = 0

    def one():
        nonlocal step
        g = torch.Generator().manual_seed(step)
        loss = m.objective(batch, generator=g)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.ema.step(m.unet.parameters())
        step += 1

    one()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        one()
    return STEPS / (time.perf_counter() - t0)


def lightning(model_dir, batch, root):
    m = JeDiModule(model_dir=model_dir, optimizer={"lr": 1e-4}, ema={"enabled": True, "decay": 0.99})
    times = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *a):
            times.append(time.perf_counter())

    trainer = L.Trainer(max_steps=STEPS + 2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[Clock()], default_root_dir=root)
    trainer.fit(m, DataLoader(OneBatch(batch), batch_size=None))
    return (len(times) - 2) / (times[-1] - times[1])  # steps/s between the 2nd and last step starts


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        model_dir = create_tiny_model_dir(d + "/tiny")
        from transformers import CLIPTokenizer

        batch = _batch(CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"))
        b1, l1 = bare(model_dir, batch), lightning(model_dir, batch, d)
        b2, l2 = bare(model_dir, batch), lightning(model_dir, batch, d)  # twice, interleaved: load drift
        b, lt = (b1 + b2) / 2, (l1 + l2) / 2
    print(f"{SETS} sets x {N} images, 32 px, tiny pixel model, CPU")
    print(f"{'':12} {'steps/s':>8} {'images/s':>9}")
    print(f"{'bare core':12} {b:8.2f} {b * SETS * N:9.1f}")
    print(f"{'Lightning':12} {lt:8.2f} {lt * SETS * N:9.1f}")
    print(f"Lightning / bare = {lt / b:.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()

"""The `make train` step on CPU: what each lever buys, as paired ratios to today's step over the same batch.

The demo's model (conf/model/tiny_pixel.yaml: pixel fold 4, 32 px, attention at both levels, x0 prediction) and
its batch shape (8 sets x 3 images, 1 reference, subject masks, subject pixels weighted 2x); one step = the
objective's forward + backward + AdamW (foreach, as configured) + the EMA update. Variants run interleaved,
`REPS` rounds, best of each kept (load from other processes hits every variant alike). Each variant is the
baseline plus one lever; `threads` is torch's intra-op thread count (this machine has 2 cores).
"""
import tempfile
import time

import torch

from jedi_train.models.tiny import create_tiny_model_dir
from jedi_train.training.module import JeDiModule

SETS, N, RES, STEPS, REPS = 8, 3, 32, 12, 3
UNET = {"block_out_channels": [64, 128], "attention_levels": 2, "heads": 4}


def _batch(tokenizer_dir):
    from transformers import CLIPTokenizer

    from jedi_train.models.components import tokenize

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir, subfolder="tokenizer")
    g = torch.Generator().manual_seed(0)
    is_ref = torch.zeros(SETS, N, dtype=torch.bool)
    is_ref[:, 0] = True
    mask = torch.zeros(SETS, N, 1, RES, RES)
    mask[..., 8:24, 8:24] = 1.0
    return {"pixel_values": torch.rand(SETS, N, 3, RES, RES, generator=g) * 2 - 1,
            "input_ids": tokenize(tok, ["a photo of a mug on the beach"] * N).expand(SETS, N, -1).clone(),
            "is_ref": is_ref, "valid": torch.ones(SETS, N, dtype=torch.bool), "subject_mask": mask}


def _module(model_dir, ema_foreach=False):
    m = JeDiModule(model_dir=model_dir, resolution=RES, prediction_type="sample", reference_attention="references",
                   objective={"subject_loss_weight": 2.0}, optimizer={"lr": 1e-3, "foreach": True},
                   ema={"enabled": True, "decay": 0.999})
    if ema_foreach:
        m.ema.foreach = True
    return m


def _stepper(m, channels_last=False, compiled=False):
    params = [p for p in m.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    if channels_last:
        m.denoiser.to(memory_format=torch.channels_last)
    if compiled:
        m.denoiser.forward = torch.compile(m.denoiser.forward, dynamic=False)
    state = {"i": 0}

    def step(batch):
        loss = m.objective(batch, generator=torch.Generator().manual_seed(state["i"]))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.ema.step(params)
        state["i"] += 1
        return float(loss)

    return step


def main(variants=("baseline", "baseline (again: the noise)", "threads=1", "ema foreach", "channels_last",
                  "ema foreach + channels_last", "compile")):
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = create_tiny_model_dir(tmp + "/tiny", resolution=RES, pixel_fold=4, unet_kwargs=UNET)
        batch = _batch(model_dir)
        steppers, setup = {}, {}
        for name in variants:
            torch.manual_seed(0)
            m = _module(model_dir, ema_foreach="ema foreach" in name)
            steppers[name] = _stepper(m, channels_last="channels_last" in name, compiled="compile" in name)
            torch.set_num_threads(1 if name == "threads=1" else threads)
            t0 = time.perf_counter()
            steppers[name](batch)  # warm-up (compile: the compile itself)
            setup[name] = time.perf_counter() - t0
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(REPS):
            for name in variants:
                torch.set_num_threads(1 if name == "threads=1" else threads)
                t0 = time.perf_counter()
                for _ in range(STEPS):
                    steppers[name](batch)
                best[name] = min(best[name], (time.perf_counter() - t0) / STEPS)
        torch.set_num_threads(threads)
    base = best["baseline"]
    print(f"demo step ({SETS} sets x {N} images, {RES} px, demo model), best of {REPS} x {STEPS} steps, "
          f"{threads} threads unless named")
    for name in variants:
        print(f"  {name:28} {best[name] * 1e3:7.1f} ms/step  {1 / best[name]:5.2f} steps/s  "
              f"speedup {base / best[name]:.2f}x  (first step {setup[name]:.1f} s)")
    return best


if __name__ == "__main__":
    main()

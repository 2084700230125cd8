"""`make gpu-check` (python -m bench.gpu): everything a lent GPU should measure, in one prepared command (<= 8 min on
one H100). The same code runs on CPU at tiny shapes (`--device cpu --tiny`, in the test suite), so it is known
to work before a GPU ever sees it.

  (a) unet     SD-1.5-size joint UNet training step (forward + backward) at 512 px (64x64 latents), sets of N = 4,
               bf16 autocast, gradient checkpointing off / on: images/s, peak memory, MFU (FLOPs of the step
               counted by torch's FlopCounterMode, over the device's dense bf16 peak), vs the plain diffusers UNet
               over the same images (ratio)
  (b) flux     a FLUX.1-width block stack (2 double + 4 single-stream blocks, width 3072) joint vs plain at 512 px,
               N = 3: the ratio the README could only count on the meta device
  (c) sdpa     which SDPA backend the coupled attention takes (flash / efficient / cudnn / math), unmasked and
               masked (a set in "no references" mode): the first backend in PyTorch's priority order that runs
  (d) zero     jedi-train with DeepSpeed ZeRO-2 and ZeRO-3 on the tiny SD and FLUX models: 20 steps, resume to 30,
               export -- pass / fail (needs CUDA: Lightning's DeepSpeed strategy refuses the CPU)
  (e) cache    sampling time per image with / without the reference KV cache at K = 1, 3, 5
Writes OUT/gpu_report.json and OUT/gpu_report.md (a markdown table for the README) and prints the device.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

# dense bf16 peak FLOP/s by device name (vendor figures, no sparsity); unknown devices get no MFU
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8, "in_channels": 4,
             "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280)}
FLUX_BLOCKS = {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 128, "num_attention_heads": 24,
               "joint_attention_dim": 4096, "pooled_projection_dim": 768, "in_channels": 64, "guidance_embeds": True}
TINY_UNET = {"sample_size": 16, "cross_attention_dim": 32, "attention_head_dim": 2, "in_channels": 4, "out_channels": 4,
             "block_out_channels": (32, 64), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 8, "layers_per_block": 1}
TINY_FLUX = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 32, "pooled_projection_dim": 32, "in_channels": 64, "guidance_embeds": True,
             "axes_dims_rope": (4, 6, 6)}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Seconds per call of fn() after `warmup` calls, synchronized."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def step_figures(step, device, images: int, reps: int) -> dict:
    """images/s, peak memory and FLOPs (and MFU) of one training step `step()` (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, reps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    top = peak_flops(device)
    return {"images_per_s": images / seconds, "step_ms": seconds * 1e3, "tflop_per_step": flops / 1e12,
            "peak_memory_gib": None if peak is None else peak / 2**30,
            "mfu": None if top is None else flops / seconds / top}


def _set_layout(sets: int, n: int, device, coupled: bool = True, padded: bool = False):
    """Sets of n (one reference each); padded: the last image of each set is padding (a key mask)."""
    from jedi_train.models.attention import SetLayout

    is_ref = torch.zeros(sets, n, dtype=torch.bool)
    is_ref[:, 0] = True
    valid = torch.ones(sets, n, dtype=torch.bool)
    valid[:, -1] = not padded
    layout = SetLayout.build(is_ref, valid=valid, coupled=torch.full((sets,), coupled))
    return layout, is_ref.flatten().to(device)


def bench_unet(device, dtype, tiny: bool, reps: int) -> dict:
    """(a): the joint UNet vs the plain diffusers UNet over the same images, checkpointing off / on."""
    from diffusers import UNet2DConditionModel

    from jedi_train.models.joint import JeDiConfig
    from jedi_train.models.joint_unet import JointUNet2DConditionModel
    from jedi_train.models.text import TextEmbeddings

    cfg = TINY_UNET if tiny else SD15_UNET
    sets, n = (1, 4) if tiny else (2, 4)
    images, size = sets * n, cfg["sample_size"]
    torch.manual_seed(0)
    plain = UNet2DConditionModel(**cfg).to(device).train()
    joint = JointUNet2DConditionModel(**cfg).make_joint(JeDiConfig(pixel_fold=1)).to(device).train()
    x = torch.randn(images, 4, size, size, device=device)
    t = torch.randint(0, 1000, (images,), device=device)
    text = torch.randn(images, 77 if not tiny else 8, cfg["cross_attention_dim"], device=device)
    layout, is_ref = _set_layout(sets, n, device)
    joint_in = joint.assemble_input(x, x, is_ref)
    out = {"shape": f"{'tiny' if tiny else 'SD-1.5'} UNet, {size}x{size} latents, {sets} sets x {n} images",
           "parameters_m": sum(p.numel() for p in joint.parameters()) / 1e6}

    def step(model, call):
        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = call().float().pow(2).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    for ckpt in (False, True):
        for m in (plain, joint):
            (m.enable_gradient_checkpointing if ckpt else m.disable_gradient_checkpointing)()
        key = "checkpointing" if ckpt else "no_checkpointing"
        p = step_figures(step(plain, lambda: plain(x, t, text).sample), device, images, reps)
        j = step_figures(step(joint, lambda: joint.denoise(joint_in, t, TextEmbeddings(text), layout)), device,
                         images, reps)
        out[key] = {"plain": p, "joint": j, "joint_over_plain_time": j["step_ms"] / p["step_ms"]}
    return out


def bench_flux(device, dtype, tiny: bool, reps: int) -> dict:
    """(b): a FLUX.1-width block stack, joint (coupled sets of 3) vs plain over the same images."""
    from diffusers import FluxTransformer2DModel

    from jedi_train.models.joint import JeDiConfig
    from jedi_train.models.joint_flux import JointFluxTransformer2DModel, image_ids, pack
    from jedi_train.models.text import TextEmbeddings

    cfg = TINY_FLUX if tiny else FLUX_BLOCKS
    sets, n = 1, 3
    images, size, text_len = sets * n, (16 if tiny else 64), (8 if tiny else 512)  # 64x64 latents: 512 px
    torch.manual_seed(0)
    plain = FluxTransformer2DModel(**cfg).to(device, dtype).train()
    joint = JointFluxTransformer2DModel(**cfg).make_joint(JeDiConfig(resolution=size * 8)).to(device, dtype).train()
    x = torch.randn(images, 16, size, size, device=device, dtype=dtype)
    hidden = torch.randn(images, text_len, cfg["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(images, cfg["pooled_projection_dim"], device=device, dtype=dtype)
    t = torch.rand(images, device=device) * 1000
    layout, is_ref = _set_layout(sets, n, device)
    joint_in = joint.assemble_input(x, x, is_ref)
    ids = image_ids(size, size, device)
    guidance = torch.ones(images, device=device)

    def step(model, call):
        def run():
            call().float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    p = step_figures(step(plain, lambda: plain(
        hidden_states=pack(x), encoder_hidden_states=hidden, pooled_projections=pooled, timestep=t / 1000,
        img_ids=ids, txt_ids=torch.zeros(text_len, 3, device=device), guidance=guidance).sample), device, images, reps)
    j = step_figures(step(joint, lambda: joint.denoise(joint_in, t, TextEmbeddings(hidden, pooled), layout,
                                                        guidance=1.0)), device, images, reps)
    return {"shape": f"{'tiny' if tiny else 'FLUX.1-width'} MM-DiT ({cfg['num_layers']} double + "
                     f"{cfg['num_single_layers']} single blocks), {size}x{size} latents, {text_len} text tokens, "
                     f"1 set x {n} images", "plain": p, "joint": j,
            "joint_over_plain_time": j["step_ms"] / p["step_ms"],
            "joint_over_plain_flops": j["tflop_per_step"] / p["tflop_per_step"]}


def bench_sdpa(device, dtype, tiny: bool) -> dict:
    """(c): the first SDPA backend, in PyTorch's priority order, under which the coupled attention runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from jedi_train.models.joint import JeDiConfig
    from jedi_train.models.joint_unet import JointUNet2DConditionModel
    from jedi_train.models.text import TextEmbeddings

    cfg = TINY_UNET if tiny else SD15_UNET
    torch.manual_seed(0)
    model = JointUNet2DConditionModel(**cfg).make_joint(JeDiConfig(pixel_fold=1)).to(device, dtype).eval()
    size = cfg["sample_size"]
    x = torch.randn(4, 4, size, size, device=device, dtype=dtype)
    text = TextEmbeddings(torch.randn(4, 8, cfg["cross_attention_dim"], device=device, dtype=dtype))
    t = torch.full((4,), 500, device=device)
    order = [b for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH") if hasattr(SDPBackend, b)]
    out = {}
    cases = (("full sets (no mask)", True, False), ("a padded set (key mask)", True, True),
             ("no-reference mode (two calls)", False, False))
    for name, coupled, padded in cases:
        layout, is_ref = _set_layout(1, 4, device, coupled=coupled, padded=padded)
        model_in = model.assemble_input(x, x, is_ref)
        works = []
        for backend in order:
            try:
                with torch.no_grad(), sdpa_kernel([getattr(SDPBackend, backend)]):
                    model.denoise(model_in, t, text, layout)
                works.append(backend.lower())
            except RuntimeError:
                continue
        out[name] = {"taken": works[0] if works else None, "runs_under": works}
    return out


def _jedi(tool: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), tool)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "JEDI_ROOT": cwd}
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)


def bench_zero(device, tiny: bool) -> dict:
    """(d): DeepSpeed ZeRO-2 / ZeRO-3 through jedi-train on the tiny SD and FLUX models: 20 steps, resume to 30,
    export. Each cell: pass, or the last line of what failed."""
    if device.type != "cuda":
        return {"skipped": "DeepSpeed through Lightning needs CUDA (its strategy refuses the CPU); the CPU path is "
                           "tested with a shim in tests/test_distributed.py"}
    out = {}
    for model in ("tiny_pixel", "tiny_flux"):
        for stage in ("deepspeed_zero2", "deepspeed_zero3"):
            with tempfile.TemporaryDirectory() as tmp:
                run = os.path.join(tmp, "run")
                base = ["experiment=demo", f"model={model}", f"strategy={stage}", "trainer=gpu", "trainer.devices=1",
                        "data.synthesize_if_missing.num_sets=64", "callbacks.identity_gain.num_sets=4",
                        "callbacks.model_checkpoint.every_n_train_steps=10", f"paths.output_dir={run}"]
                cells = [("train 20", [*base, "trainer.max_steps=20"]), ("resume to 30", [*base, "trainer.max_steps=30"])]
                result = "pass"
                for what, args in cells:
                    p = _jedi("jedi-train", *args, cwd=tmp)
                    if p.returncode != 0:
                        result = f"{what} failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}"
                        break
                if result == "pass":
                    p = _jedi("jedi-export", os.path.join(run, "checkpoints", "last.ckpt"), os.path.join(tmp, "x"),
                              cwd=tmp)
                    if p.returncode != 0:
                        result = f"export failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}"
                out[f"{model} {stage}"] = result
    return out


def bench_cache(device, tiny: bool, reps: int) -> dict:
    """(e): sampling seconds per image with / without the reference KV cache at K = 1, 3, 5 (tiny pixel model)."""
    import numpy as np

    from jedi_train.models.components import load_components
    from jedi_train.models.joint import JeDiConfig
    from jedi_train.models.tiny import create_tiny_model_dir
    from jedi_train.pipelines.pipeline_jedi import JeDiBasePipeline

    with tempfile.TemporaryDirectory() as tmp:
        resolution = 32 if tiny else 64
        c = load_components(create_tiny_model_dir(tmp, resolution=resolution, pixel_fold=2),
                            JeDiConfig(reference_attention="references"))
        pipe = JeDiBasePipeline.from_components(c).to(device)
        pipe.set_progress_bar_config(disable=True)
        prompts, steps = (2, 2) if tiny else (4, 25)
        rows = {}
        for k in (1, 3, 5):
            refs = [np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8) for i in range(k)]

            def call(cache, refs=refs):
                pipe(reference_images=refs, prompt=[f"prompt {i}" for i in range(prompts)], num_inference_steps=steps,
                     guidance_scale=3.0, image_guidance_scale=2.0, use_reference_cache=cache, output_type="pt",
                     generator=torch.Generator().manual_seed(0))
            plain, cached = (timed(lambda c=cache: call(c), device, reps) / prompts for cache in (False, True))
            rows[k] = {"no_cache_ms": plain * 1e3, "cache_ms": cached * 1e3, "speedup": plain / cached}
    return {"shape": f"tiny pixel model {resolution} px, {steps} DDIM steps, {prompts} targets per call", "rows": rows}


def markdown(report: dict) -> str:
    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    lines = [f"# gpu-check on {report['device']} ({report['dtype']}, torch {report['torch']})", ""]
    if "unet" in report and "error" not in report["unet"]:
        u = report["unet"]
        lines += [f"**(a) {u['shape']}**", "", "| checkpointing | model | images/s | step ms | peak GiB | TFLOP/step | MFU |",
                  "|---|---|---|---|---|---|---|"]
        for key in ("no_checkpointing", "checkpointing"):
            for m in ("plain", "joint"):
                r = u[key][m]
                lines.append(f"| {key.replace('_', ' ')} | {m} | {f(r['images_per_s'], '.1f')} | {f(r['step_ms'], '.1f')} "
                             f"| {f(r['peak_memory_gib'])} | {f(r['tflop_per_step'], '.3f')} | {f(r['mfu'], '.1%')} |")
            lines.append(f"| {key.replace('_', ' ')} | joint / plain time | {f(u[key]['joint_over_plain_time'])} | | | | |")
        lines.append("")
    if "flux" in report and "error" not in report["flux"]:
        x = report["flux"]
        lines += [(f"**(b) {x['shape']}**: joint / plain step time {f(x['joint_over_plain_time'])}, FLOPs "
                   f"{f(x['joint_over_plain_flops'], '.3f')}; joint {f(x['joint']['images_per_s'], '.1f')} images/s, "
                   f"MFU {f(x['joint']['mfu'], '.1%')}"), ""]
    if "sdpa" in report and "error" not in report["sdpa"]:
        lines += ["**(c) SDPA backend of the coupled attention**: " + "; ".join(
            f"{k}: {v['taken']} (runs under {', '.join(v['runs_under'])})" for k, v in report["sdpa"].items()), ""]
    if "zero" in report:
        z = report["zero"]
        lines += ["**(d) DeepSpeed through jedi-train**: " + ("; ".join(f"{k}: {v}" for k, v in z.items())), ""]
    if "cache" in report and "error" not in report["cache"]:
        c = report["cache"]
        lines += [f"**(e) reference KV cache**, {c['shape']}", "", "| K | no cache ms/image | cache ms/image | speedup |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {f(r['no_cache_ms'], '.1f')} | {f(r['cache_ms'], '.1f')} | {f(r['speedup'])} |"
                  for k, r in c["rows"].items()]
    errors = [f"- {k}: {v['error']}" for k, v in report.items() if isinstance(v, dict) and "error" in v]
    return "\n".join(lines + (["", "Errors:", *errors] if errors else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke run the test suite does)")
    p.add_argument("--out", default="gpu-check", help="folder for gpu_report.json / gpu_report.md")
    p.add_argument("--only", default="unet,flux,sdpa,zero,cache", help="comma-separated sections")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 on CUDA, 2 on CPU)")
    args = p.parse_args(argv)
    from jedi_common.atomic import atomic_write_text

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.reps or (10 if device.type == "cuda" else 2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"gpu-check on {name}, {str(dtype).split('.')[-1]}, {'tiny' if args.tiny else 'real'} shapes", flush=True)
    report = {"device": name, "dtype": str(dtype).split(".")[-1], "torch": torch.__version__, "tiny": args.tiny}
    sections = {"unet": lambda: bench_unet(device, dtype, args.tiny, reps),
                "flux": lambda: bench_flux(device, dtype, args.tiny, reps),
                "sdpa": lambda: bench_sdpa(device, dtype, args.tiny),
                "zero": lambda: bench_zero(device, args.tiny),
                "cache": lambda: bench_cache(device, args.tiny, reps)}
    for key in [s for s in args.only.split(",") if s]:
        t0 = time.perf_counter()
        try:  # one section failing must not cost the others' figures: a lent GPU's minutes are few
            report[key] = sections[key]()
        except Exception as e:  # noqa: BLE001
            report[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                           "traceback": traceback.format_exc()[-2000:]}
        print(f"  {key}: {time.perf_counter() - t0:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "gpu_report.json"), json.dumps(report, indent=2, default=str) + "\n")
    table = markdown(report)
    atomic_write_text(os.path.join(args.out, "gpu_report.md"), table)
    print(table)
    return 1 if any(isinstance(v, dict) and "error" in v for v in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

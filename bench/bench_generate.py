"""jedi-generate throughput: a 16-job file on the tiny pixel pipeline vs the same images made by a loop of
jedi-sample calls (one process per call: start, load, sample, write, as a user's shell loop does; jedi-generate is one
process too), and the cost of
--check identity,prompt with tiny random DINO / CLIP extractors.

Every job: 2 references, 2 prompts x 1 image, 10 steps, independent images (joint false), so each jedi-sample
call makes the same two images (one prompt per call would be closer still; two keeps the loop from being all
start-up). Figures are ratios to the jedi-sample loop measured in the same run. In process (the pipeline loaded
once in every case): jedi-generate batching images of several jobs into one sampling call (--images-per-call 8)
vs one image per call, vs a loop of sampling.generate per job. One intra-op thread (a shared 2-core machine).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from jedi_train.models.tiny import create_tiny_extractor_dirs

JOBS, STEPS = 16, 10


def _setup(tmp, n_jobs):
    from jedi_train.models.components import load_components
    from jedi_train.models.joint import JeDiConfig
    from jedi_train.models.tiny import create_tiny_model_dir
    from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

    components = load_components(create_tiny_model_dir(os.path.join(tmp, "tiny"), resolution=32, pixel_fold=2),
                                 JeDiConfig(reference_attention="references"))
    pipe_dir = os.path.join(tmp, "pipeline")
    JeDiPipeline.from_components(components).save_pretrained(pipe_dir, safe_serialization=True)
    jobs = []
    for j in range(n_jobs):
        folder = os.path.join(tmp, "refs", f"s{j}")
        os.makedirs(folder)
        for k in range(2):
            arr = np.random.default_rng([j, k]).integers(0, 256, (48, 48, 3), np.uint8)
            Image.fromarray(arr).save(os.path.join(folder, f"{k}.png"))
        jobs.append({"id": f"s{j}", "references": folder, "prompts": [f"a toy {j}", f"a toy {j} on the beach"],
                     "steps": STEPS, "guidance": 3, "image_guidance": 3})
    path = os.path.join(tmp, "jobs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(j) + "\n" for j in jobs)
    return pipe_dir, path, jobs


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def _generate(pipe_dir, jobs_path, out, n_images, *extra):
    """One jedi-generate process (start-up included, as for each jedi-sample call)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jedi_train.cli.generate", pipe_dir, "--jobs", jobs_path, "--out", out,
                    "--no-progress", *extra], check=True, env=_env(), capture_output=True)
    seconds = time.perf_counter() - t0
    with open(os.path.join(out, "results.csv")) as f:
        assert sum(1 for _ in f) == n_images + 1
    return seconds


def _sample_loop(pipe_dir, jobs, out):
    env = _env()
    t0 = time.perf_counter()
    for j in jobs:
        cmd = [sys.executable, "-m", "jedi_train.cli.sample", pipe_dir, "--ref", j["references"], "--num", "1",
               "--out", os.path.join(out, j["id"]), "--steps", str(STEPS), "--guidance", "3", "--image-guidance", "3"]
        for p in j["prompts"]:
            cmd += ["--prompt", p]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def _in_process(pipe_dir, jobs_path, jobs, out):
    """Loading once, no process start-up: jedi-generate's Runner vs a loop of sampling.generate per job (what
    jedi-app does per request). Their ratio is jedi-generate's own overhead (records, reports, resume checks)."""
    from jedi_train.generate.run import Options, Runner
    from jedi_train.sampling import generate, load_pipeline, prepare_references

    t0 = time.perf_counter()
    pipe = load_pipeline(pipe_dir, "cpu", progress=False)
    for j in jobs:
        refs, _ = prepare_references([j["references"]])
        result, _ = generate(pipe, refs, j["prompts"], 1, 0, STEPS, 3.0, 3.0, 8)
        os.makedirs(os.path.join(out, "loop", j["id"]), exist_ok=True)
        for i, img in enumerate(result.images):
            img.save(os.path.join(out, "loop", j["id"], f"{i}.png"))
    loop = time.perf_counter() - t0
    runs = {}
    for per_call in (1, 8):
        t0 = time.perf_counter()
        Runner(Options(pipe_dir, jobs_path, os.path.join(out, f"gen{per_call}"), device="cpu", progress=False,
                       images_per_call=per_call), say=lambda line: None).run()
        runs[per_call] = time.perf_counter() - t0
    return loop, runs[1], runs[8]


def main(n_jobs=JOBS):
    torch.set_num_threads(1)
    images = 2 * n_jobs
    with tempfile.TemporaryDirectory() as tmp:
        pipe_dir, jobs_path, jobs = _setup(tmp, n_jobs)
        dino, clip = create_tiny_extractor_dirs(tmp)
        loop = _sample_loop(pipe_dir, jobs, os.path.join(tmp, "loop"))
        plain = _generate(pipe_dir, jobs_path, os.path.join(tmp, "gen"), images)
        checked = _generate(pipe_dir, jobs_path, os.path.join(tmp, "gen_check"), images, "--check",
                            "identity,prompt", "--dino", dino, "--clip", clip)
        ip_loop, ip_one, ip_gen = _in_process(pipe_dir, jobs_path, jobs, os.path.join(tmp, "inproc"))
    print(f"{n_jobs} jobs x 2 images, tiny pixel pipeline 32 px, {STEPS} steps, 2 references each")
    print(f"{'':34} {'seconds':>8} {'images/s':>9} {'ratio':>7}")
    print(f"{f'jedi-sample loop ({n_jobs} processes)':34} {loop:8.2f} {images / loop:9.2f} {1.0:7.2f}")
    print(f"{'jedi-generate (1 process)':34} {plain:8.2f} {images / plain:9.2f} {loop / plain:7.2f}x faster")
    print(f"{'jedi-generate --check':34} {checked:8.2f} {images / checked:9.2f} {checked / plain:7.2f}x the time "
          "of jedi-generate (tiny DINO + CLIP)")
    print(f"{'in process: sampling.generate loop':34} {ip_loop:8.2f} {images / ip_loop:9.2f} {1.0:7.2f}")
    print(f"{'in process: jedi-generate, 1 per call':34} {ip_one:8.2f} {images / ip_one:9.2f} {ip_loop / ip_one:7.2f}x "
          "faster")
    print(f"{'in process: jedi-generate, 8 per call':34} {ip_gen:8.2f} {images / ip_gen:9.2f} {ip_loop / ip_gen:7.2f}x "
          f"faster ({ip_one / ip_gen:.2f}x from batching jobs into one call)")
    return {"loop_s": loop, "generate_s": plain, "check_s": checked, "in_process_loop_s": ip_loop,
            "in_process_one_per_call_s": ip_one, "in_process_generate_s": ip_gen}


if __name__ == "__main__":
    main()

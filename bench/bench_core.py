"""Joint UNet training step vs a plain diffusers UNet step over the same B*N independent images.

Both are timed in this run, interleaved, on the tiny config; the ratio is what matters.
Peak memory (RSS delta of a fresh subprocess) for N = 2, 4, 8 shows how the coupled attention scales.
"""
import json
import subprocess
import sys
import tempfile

import torch
from diffusers import UNet2DConditionModel

from bench.timing import seconds_per_call
from jedi_train.models.attention import SetLayout
from jedi_train.models.joint_unet import JointUNet2DConditionModel
from jedi_train.models.tiny import tiny_unet_config


def _models(res):
    torch.manual_seed(0)
    cfg = tiny_unet_config(res, pixel_fold=2)
    plain = UNet2DConditionModel(**cfg)
    joint = JointUNet2DConditionModel(**cfg).make_joint()
    return plain, joint, cfg["in_channels"]


def _step_fns(res, sets, n):
    plain, joint, c = _models(res)
    bn, s = sets * n, res // 2
    x, e = torch.randn(bn, c, s, s), torch.randn(bn, 16, 64)
    t = torch.randint(0, 1000, (bn,))
    is_ref = torch.zeros(sets, n, dtype=torch.bool)
    is_ref[:, 0] = True
    layout = SetLayout.build(is_ref)
    inp = joint.assemble_input(x, x, is_ref.flatten())

    def plain_step():
        plain(x, t, e).sample.square().mean().backward()

    def joint_step():
        joint(inp, t, e, set_layout=layout).sample.square().mean().backward()

    return plain_step, joint_step


def _time(fn, reps):
    return seconds_per_call(lambda i: fn(), reps)


def speed_table(sets=8, n=3, reps=6):
    print(f"one training step (forward+backward), {sets} sets x {n} images, tiny pixel UNet (fold 2)")
    print(f"{'res':>5} {'plain ms':>9} {'joint ms':>9} {'joint/plain':>12}")
    rows = {}
    for res in (32, 64):
        plain_step, joint_step = _step_fns(res, sets, n)
        p = j = 0.0
        for _ in range(3):  # interleave so drift in machine load hits both
            p += _time(plain_step, reps)
            j += _time(joint_step, reps)
        rows[res] = j / p
        print(f"{res:>5} {p / 3 * 1e3:9.1f} {j / 3 * 1e3:9.1f} {j / p:12.3f}")
    return rows


_MEM_CHILD = r"""
import gc, json, sys, threading, time, psutil, torch
from bench.bench_core import _step_fns
res, sets, n, joint = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
torch.set_num_threads(1)
plain_step, joint_step = _step_fns(res, sets, n)
step = joint_step if joint else plain_step
step(); gc.collect()  # warm-up: allocator pools and lazy inits are not the step's memory
proc, peak, done = psutil.Process(), [0], [False]
base = proc.memory_info().rss
def poll():  # RSS sampled every ms: CPU tensors are not tracked by tracemalloc
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.001)
th = threading.Thread(target=poll); th.start()
step(); done[0] = True; th.join()
print(json.dumps((peak[0] - base) / 2**20))
"""


def _peak_mb(res, sets, n, joint):
    out = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(res), str(sets), str(n), "1" if joint else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(res=64, sets=2):
    print(f"\npeak memory of one step (MB above the warmed-up process), {sets} sets, {res}px")
    print(f"{'N':>3} {'plain MB':>9} {'joint MB':>9} {'joint/N MB':>11} {'joint/plain':>12}")
    for n in (2, 4, 8):
        p, j = _peak_mb(res, sets, n, False), _peak_mb(res, sets, n, True)
        print(f"{n:>3} {p:9.1f} {j:9.1f} {j / n:11.1f} {j / max(p, 1e-9):12.3f}")


def main():
    with tempfile.TemporaryDirectory():
        speed_table()
        memory_table()


if __name__ == "__main__":
    main()

"""`make gpu-check` (bench/gpu.py) runs on CPU at tiny shapes, so it is known to work before a GPU sees it: every
section reports, the DeepSpeed cell says why it is skipped off CUDA, and the markdown table is written."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_at_tiny_shapes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # tiny ops: one thread (see one_thread)
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--tiny", "--reps", "1",
                        "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["device"].startswith("cpu") and report["tiny"] is True
    for key in ("no_checkpointing", "checkpointing"):
        cell = report["unet"][key]
        assert cell["joint"]["images_per_s"] > 0 and cell["plain"]["tflop_per_step"] > 0
        assert math.isfinite(cell["joint_over_plain_time"]) and cell["joint"]["mfu"] is None  # no peak known on CPU
    flux = report["flux"]
    assert flux["joint_over_plain_flops"] > 1.0  # the coupled attention sees more keys: more work, counted
    assert all(v["taken"] for v in report["sdpa"].values()) and "math" in report["sdpa"]["full sets (no mask)"]["runs_under"]
    assert "needs CUDA" in report["zero"]["skipped"]
    assert set(report["cache"]["rows"]) == {"1", "3", "5"}
    assert all(r["speedup"] > 0 for r in report["cache"]["rows"].values())
    table = (tmp_path / "gpu_report.md").read_text()
    assert "| joint / plain time |" in table and "reference KV cache" in table and "Errors" not in table

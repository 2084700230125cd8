"""jedi-app served on a free localhost port for the tests that talk to a running server (the browser test, the
Gradio-queue load test): `running_app(pipe_dir, log_dir, *args)` yields (url, process, log path) once the page
answers, and stops the server by its pid afterwards."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_app(pipe_dir: str, log_dir, *args: str, start_timeout: float = 120):
    port, log = free_port(), log_dir / "app.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jedi_train.cli.app", pipe_dir, "--port", str(port), *args],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + start_timeout
        while not answers(url):
            assert proc.poll() is None, f"jedi-app exited {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"jedi-app did not answer in {start_timeout:.0f} s: " \
                                                f"{log.read_text()[-3000:]}"
            time.sleep(0.3)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

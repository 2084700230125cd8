"""Console scripts without paying their imports each time: a "zygote" process imports the jedi_train CLIs
(torch, Lightning, diffusers, W&B: ~7 s of CPU per process, 15-20 s on a loaded 2-core CI box) once per
pytest worker, then forks a child per command. The child is a process of its own, as `subprocess.run` gives:
its argv, environment and working directory are the command's, its stdout/stderr go to files, it runs the
console script file itself (`BIN/jedi-train`, as `__main__`), exits through atexit handlers as an interpreter
does, and its exit status (or killing signal) is the returncode. Only the imports are shared, and the zygote
never runs a command itself, so every child starts from the same freshly-imported state.

run(argv, env, cwd, timeout) -> subprocess.CompletedProcess, for argv[0] a console script in BIN. Anything
else (another interpreter, a script that is not ours), JEDI_TEST_ZYGOTE=0, or a zygote that failed to start
falls back to a real subprocess.run.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

BIN = Path(sys.executable).parent
TESTS = str(Path(__file__).resolve().parents[1])
PRELOAD = ("jedi_train.cli.train", "jedi_train.cli.export", "jedi_train.cli.sample", "jedi_train.cli.eval",
           "jedi_train.cli.data", "jedi_train.train", "wandb")
# read when the CLIs are imported (not when they run): a command with other values gets a real subprocess
IMPORT_TIME_ENV = ("PYTHONPATH", "PYTHONHASHSEED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                   "TORCH_HOME", "PATH", "LD_LIBRARY_PATH", "DS_ACCELERATOR")
TOOLS = {"jedi-train", "jedi-export", "jedi-sample", "jedi-eval", "jedi-data"}


def _own_module_tempdirs() -> None:
    """Module-level TemporaryDirectory objects (W&B's media dir) were made by the zygote's imports and are
    removed at exit by whoever holds them: each child gets its own, as its own imports would have made, and
    leaves the zygote's for the next child."""
    import warnings

    with warnings.catch_warnings():  # isinstance on some modules' deprecated attributes warns
        warnings.simplefilter("ignore")
        found = [(mod, key, value) for mod in list(sys.modules.values())
                 for key, value in list(getattr(mod, "__dict__", {}).items())
                 if isinstance(value, tempfile.TemporaryDirectory)]
    for mod, key, value in found:
        value._finalizer.detach()
        suffix = os.path.basename(value.name)[len(tempfile.gettempprefix()) + 8:]  # tmpXXXXXXXX<suffix>
        setattr(mod, key, tempfile.TemporaryDirectory(suffix=suffix))


def _child(req: dict, channel: int) -> None:
    """In the forked child: become the command, run it, exit as `python BIN/tool args` would."""
    import runpy

    code = 1
    try:
        os.setsid()  # its own process group: a timeout kills it with whatever it started
        os.close(channel)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.path[:] = [str(BIN) if p == "" else p for p in sys.path if p != TESTS]  # as `python BIN/tool` has it
        tempfile.tempdir = None  # read $TMPDIR again
        _own_module_tempdirs()
        if "numpy" in sys.modules:  # a fresh interpreter seeds numpy's global RNG from the OS (random reseeds itself)
            sys.modules["numpy"].random.seed()
        if "OMP_NUM_THREADS" in os.environ:  # a fresh interpreter would size torch's pool from it
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = list(req["argv"])
        try:
            runpy.run_path(req["argv"][0], run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - an uncaught exception: traceback, exit 1, as the interpreter does
            import traceback

            traceback.print_exc()
            code = 1
        threading._shutdown()  # join non-daemon threads, then atexit, as interpreter shutdown does
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os._exit(code & 0xFF)


def serve() -> None:
    """The zygote's loop: one JSON request per line on stdin, one JSON answer per line on stdout."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    channel = os.fdopen(os.dup(1), "w")
    sys.stdin = os.fdopen(os.dup(0), "r")  # fd 0 becomes the child's /dev/null
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the channel
    channel.write(json.dumps({"ready": os.getpid()}) + "\n")
    channel.flush()
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req, channel.fileno())
        channel.write(json.dumps({"pid": pid}) + "\n")
        channel.flush()
        _, status = os.waitpid(pid, 0)
        channel.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        channel.flush()


class _Zygote:
    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        boot = f"import sys; sys.path.insert(0, {TESTS!r}); from helpers.zygote import serve; serve()"
        self.proc = subprocess.Popen([sys.executable, "-c", boot], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline()
        if not ready.startswith('{"ready"'):
            raise RuntimeError(f"zygote did not start: {ready!r}")

    def run(self, argv, env, cwd, timeout) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="zygote-") as d:
            out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
            req = {"argv": [str(a) for a in argv], "env": dict(env), "cwd": str(cwd), "stdout": out, "stderr": err}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.proc.stdout.readline())["pid"]
            killed = []
            timer = threading.Timer(timeout, lambda: killed.append(_kill_group(pid)))
            timer.start()
            try:
                answer = self.proc.stdout.readline()
            finally:
                timer.cancel()
            if not answer:
                raise RuntimeError("the zygote died")
            rc = json.loads(answer)["rc"]
            stdout, stderr = (Path(p).read_text(errors="replace") for p in (out, err))
        if killed:
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess(list(argv), rc, stdout, stderr)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _kill_group(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_zygote: _Zygote | None = None
_failed = False
_lock = threading.Lock()


def run(argv, env: dict, cwd, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)."""
    global _zygote, _failed
    tool = Path(str(argv[0]))
    if os.environ.get("JEDI_TEST_ZYGOTE", "1") == "0" or tool.parent != BIN or tool.name not in TOOLS:
        return subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)
    if any(env.get(k) != os.environ.get(k) for k in IMPORT_TIME_ENV):  # the zygote imported under other values
        return subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)
    with _lock:
        if _zygote is None and not _failed:
            try:
                _zygote = _Zygote()
                atexit.register(_zygote.close)
            except Exception:  # noqa: BLE001 - no zygote: plain subprocesses
                _failed = True
        if _zygote is None:
            return subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        return _zygote.run(argv, env, cwd, timeout)

#!/usr/bin/env python3
"""A real single-node SLURM cluster on localhost, for tests, CI and trying the launch templates.

    python launch/local_slurm.py start            # prints: export SLURM_CONF=...
    eval "$(python launch/local_slurm.py env)"    # point sbatch/squeue/scontrol at it
    sbatch launch/sbatch_train.sh ...
    python launch/local_slurm.py status
    python launch/local_slurm.py stop             # cancels jobs, stops the daemons by their pid files

Needs root and the Debian packages `slurmctld slurmd slurm-client munge`. Everything (munge key and
socket, slurm.conf, state, spool, logs, pid files) lives in one state dir (default
$JEDI_SLURM_DIR or /tmp/jedi-slurm), and the daemons listen on free ports, so it neither touches
/etc nor collides with a system SLURM or a second local cluster. The clients find it only through
SLURM_CONF; jobs inherit that variable (sbatch exports the environment), so srun inside jobs works.

Choices that matter (each was needed on Debian slurm 22.05):
- `slurmd -N localhost`: the node is called localhost whatever the machine's hostname is.
- proctrack/linuxproc + task/none: no cgroups/systemd needed (containers, CI).
- cons_tres with CR_Core_Memory and DefMemPerCPU: otherwise one job takes the whole node and a
  sweep runs its jobs one after another.
- AuthInfo cred_expire=10: `scontrol requeue` (and Lightning's auto-requeue) only restarts a job
  after the credential expiry, 120 s by default.
- No slurmdbd, so `sacct` does not work: ask `scontrol show job` (completed jobs stay visible for
  MinJobAge seconds) or `squeue`.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REQUIRED = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "sinfo", "srun")
DEFAULT_DIR = os.environ.get("JEDI_SLURM_DIR", "/tmp/jedi-slurm")
# pid file -> the executable name the pid must still belong to (guards against pid reuse)
DAEMONS = (("slurmd.pid", "slurmd"), ("slurmctld.pid", "slurmctld"), ("munge/munged.pid", "munged"))


def unavailable_reason() -> str | None:
    """Why a local cluster cannot start here, or None when it can."""
    missing = [b for b in REQUIRED if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM not installed (missing {', '.join(missing)}); "
                "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as the submitting user)"
    return None


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return max(512, int(total_kb / 1024 * 0.8))  # slurmd drains a node that claims more than it has


def _alive(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    state = stat[stat.rindex(")") + 2]
    return comm == name[:15] and state != "Z"


class LocalSlurm:
    def __init__(self, state_dir: str | os.PathLike = DEFAULT_DIR, cpus: int | None = None,
                 mem_mb: int | None = None, partition: str = "debug"):
        self.dir = Path(state_dir).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.mem_mb = mem_mb or _mem_mb()
        self.partition = partition
        self.conf = self.dir / "slurm.conf"

    # -- environment for clients -------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, check=check,
                              timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------------------
    def _pids(self) -> dict[str, int | None]:
        out = {}
        for pidfile, name in DAEMONS:
            p = self.dir / pidfile
            try:
                pid = int(p.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            out[name] = pid if pid and _alive(pid, name) else None
        return out

    def running(self) -> bool:
        return all(self._pids().values())

    def _write_conf(self) -> None:
        d = self.dir
        mem_per_cpu = max(128, self.mem_mb // self.cpus)
        self.conf.write_text(f"""\
# written by launch/local_slurm.py: a single-node cluster on localhost
ClusterName=jedilocal
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={mem_per_cpu}
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=900
KillWait=3
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 30) -> LocalSlurm:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        if self.running():
            return self
        d = self.dir
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket whose directories are not world-executable, and a key readable by others
        os.chmod(d, 0o755)
        (d / "munge").mkdir(mode=0o755, exist_ok=True)
        os.chmod(d / "munge", 0o755)
        (d / "munge" / "key").mkdir(mode=0o700, exist_ok=True)
        key = d / "munge" / "key" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        if not (self._pids()["munged"]):
            subprocess.run([_bin("munged"), f"--socket={d}/munge/munge.socket", f"--key-file={key}",
                            f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                            f"--seed-file={d}/munge/munged.seed", "--force"], check=True)
        if not self.conf.exists() or not self._pids()["slurmctld"]:
            self._write_conf()  # fresh ports each start: a previous instance's may be in TIME_WAIT
        env = self.env()
        if not self._pids()["slurmctld"]:
            subprocess.run([_bin("slurmctld"), "-f", str(self.conf)], env=env, check=True)
        if not self._pids()["slurmd"]:
            subprocess.run([_bin("slurmd"), "-f", str(self.conf), "-N", "localhost"], env=env, check=True)
        self.wait_ready(timeout)
        return self

    def node_state(self) -> str:
        r = self.run("sinfo", "-h", "-N", "-n", "localhost", "-o", "%T", check=False)
        return r.stdout.strip().lower() if r.returncode == 0 else ""

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.node_state()
            if state in ("idle", "mixed", "allocated"):
                return
            if "drain" in state:  # e.g. a restart after an unclean stop: the node is fine, resume it
                self.run("scontrol", "update", "NodeName=localhost", "State=RESUME", check=False)
            time.sleep(0.3)
        raise RuntimeError(f"local SLURM not ready after {timeout:.0f}s (node state {state!r}); "
                           f"logs in {self.dir}/log")

    def stop(self, timeout: float = 30) -> None:
        pids = self._pids()
        if pids["slurmctld"] and pids["slurmd"]:
            # slurmstepd outlives slurmd: cancel jobs first so no job processes are left behind
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-t", "R,CG", "-o", "%i", check=False).stdout.strip():
                    time.sleep(0.3)
        for pidfile, name in DAEMONS:
            pid = pids[name]
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid, name) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid, name):
                os.kill(pid, signal.SIGKILL)

    def status(self) -> str:
        pids = self._pids()
        lines = [f"state dir: {self.dir}", "daemons: " + ", ".join(f"{n}={p or 'down'}" for n, p in pids.items())]
        if all(pids.values()):
            lines.append("node: " + self.node_state())
            lines.append(self.run("squeue", check=False).stdout.rstrip())
        return "\n".join(lines)

    # -- job helpers (no sacct here) ---------------------------------------------------------
    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None, env: dict | None = None) -> str:
        r = subprocess.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd, capture_output=True,
                           text=True, timeout=30, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the job has left slurmctld's memory)."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        fields = {}
        for tok in r.stdout.split("\n")[0].split():
            k, _, v = tok.partition("=")
            fields.setdefault(k, v)
        return fields

    def wait_job(self, job_id: str, timeout: float = 300, states=("COMPLETED", "FAILED", "CANCELLED",
                                                                    "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f}s: {info.get('JobState')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("start", "stop", "status", "env"))
    ap.add_argument("--state-dir", default=DEFAULT_DIR, help="default: $JEDI_SLURM_DIR or /tmp/jedi-slurm")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs the node offers (default: this machine's)")
    ap.add_argument("--mem-mb", type=int, default=None, help="node memory (default: 80%% of this machine's)")
    a = ap.parse_args(argv)
    cluster = LocalSlurm(a.state_dir, cpus=a.cpus, mem_mb=a.mem_mb)
    if a.command == "start":
        try:
            cluster.start()
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"local_slurm: {e}", file=sys.stderr)
            return 1
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"# local SLURM up: node localhost, {cluster.cpus} CPUs; state in {cluster.dir}", file=sys.stderr)
    elif a.command == "env":
        print(f"export SLURM_CONF={cluster.conf}")
    elif a.command == "status":
        print(cluster.status())
        return 0 if cluster.running() else 3
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

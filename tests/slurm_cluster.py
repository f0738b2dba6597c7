"""A real SLURM cluster on this host for tests: munged, slurmctld and N slurmd virtual nodes.

Debian's slurm-wlm (22.05) is built with multiple-slurmd support, so several `slurmd -N nodeX`
run side by side on one machine, each with its own port and spool dir.
Everything runs in the foreground under Popen, so the harness knows each pid and stops exactly
what it started. The cluster's files live in a temp dir; SLURM_CONF points daemons and clients
at them, so /etc/slurm is not touched. Node names are mapped to 127.0.0.1 in /etc/hosts
(idempotently): the launchers use the first node's name as the master address.

Needs root and apt (to install slurm and munge when missing); `unavailable_reason()` says why
not when it cannot run.

One cluster at a time per machine: two would share munged (/run/munge, stopped by whichever cluster
started it), the node names in /etc/hosts, apt's lock, and the master ports the sbatch script derives
from job ids (both clusters number their jobs from 1). `start()` takes an exclusive lock on LOCK_FILE
(fcntl.flock, so the kernel drops it when the process dies) and `stop()` releases it: a second cluster,
from the other pytest-xdist worker or another checkout's tests, waits for the first to stop.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged", "munge"]
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
LOCK_FILE = Path("/tmp/ds-cl-test-slurm-cluster.lock")


def _free_ports(n: int) -> list[int]:
    """n distinct free ports, by ds_cl's free_port: from this pytest-xdist worker's own range when it has one
    (DS_CL_PORT_RANGE, tests/conftest.py), where the other worker's ranks cannot take them before the daemons
    bind them."""
    from ds_cl.training.environment import free_port

    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _have_binaries() -> bool:
    return all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES)


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (None when it can, possibly after an apt install)."""
    if os.geteuid() != 0:
        return "needs root (starts slurm daemons, edits /etc/hosts, may apt-get install slurm)"
    if not _have_binaries() and not shutil.which("apt-get"):
        return "slurm/munge are not installed and apt-get is missing"
    return None


def ensure_installed(log=print) -> None:
    """apt-get install slurm and munge when missing (services are not started by apt here)."""
    if _have_binaries():
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    t0 = time.time()
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not _have_binaries():
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log(f"installed {' '.join(PACKAGES)} in {time.time() - t0:.1f}s")


def ensure_hosts(names: list[str], hosts_file: Path = Path("/etc/hosts")) -> None:
    """Map each name to 127.0.0.1 unless /etc/hosts already resolves it; never adds a line twice."""
    text = hosts_file.read_text()
    known = {tok for line in text.splitlines() if not line.lstrip().startswith("#")
             for tok in line.split()[1:]}
    missing = [n for n in names if n not in known]
    if missing:
        with hosts_file.open("a") as f:
            if text and not text.endswith("\n"):
                f.write("\n")
            f.write(f"127.0.0.1 {' '.join(missing)}  # ds-cl test slurm cluster\n")


class SlurmCluster:
    """Start with `start()`, stop with `stop()` (idempotent; kills only the pids it spawned)."""

    def __init__(self, root: Path, nodes: list[str] | None = None, cpus: int = 2, gpus: int = 1):
        self.root = Path(root)
        self.nodes = nodes or ["node1", "node2"]
        self.cpus, self.gpus = cpus, gpus
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._lock = None  # LOCK_FILE, open and locked from start() to stop()

    # -- one cluster per machine -----------------------------------------------------------------
    def _acquire(self, log=print) -> None:
        f = open(LOCK_FILE, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t0 = time.time()
            log(f"slurm_cluster: another test SLURM cluster runs on this machine ({LOCK_FILE} is locked): waiting")
            fcntl.flock(f, fcntl.LOCK_EX)
            log(f"slurm_cluster: waited {time.time() - t0:.0f}s for the other cluster to stop")
        self._lock = f

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # -- configuration ---------------------------------------------------------------------------
    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        # Fake GPUs: GRES needs a File= per unit; /dev/null stands in (the tests run on CPU).
        gres = "\n".join(f"NodeName={n} Name=gpu File=/dev/null" for n in self.nodes for _ in range(self.gpus))
        (r / "gres.conf").write_text(gres + "\n")
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus} RealMemory=1000 Gres=gpu:{self.gpus} State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports))
        self.conf.write_text(f"""\
ClusterName=dscltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=5
EnforcePartLimits=ALL
KillWait=5
InactiveLimit=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    # -- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        with open(self.root / "log" / f"{name}.stdout", "w") as log:
            self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                cwd=self.root, start_new_session=True, **kw)

    def _munge_works(self) -> bool:
        if not MUNGE_SOCKET.exists():
            return False
        enc = subprocess.run(["munge", "-n"], capture_output=True)
        return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout,
                                                      capture_output=True).returncode == 0

    def _start_munge(self) -> None:
        if self._munge_works():  # someone else's munged: use it, do not own it
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():  # Debian's postinst makes one; some images skip it
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o600)
        run_dir = MUNGE_SOCKET.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        self._spawn("munged", ["/usr/sbin/munged", "--foreground"], user="munge", group="munge",
                    extra_groups=[])
        self._wait(self._munge_works, 20, "munged did not come up")

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if ok():
                return
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{what}: {name} exited {p.returncode}\n{self.logs()}")
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout}s\n{self.logs()}")

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True)

    def _nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def start(self) -> "SlurmCluster":
        if self._lock is None:
            self._acquire()
        ensure_installed()  # under the lock: no two apt-get at once (nothing to do once installed)
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        ensure_hosts(self.nodes)
        self._start_munge()
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-c", "-i"])
        self._wait(lambda: self.scontrol("ping").returncode == 0 and "UP" in self.scontrol("ping").stdout,
                   30, "slurmctld did not answer ping")
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", ["/usr/sbin/slurmd", "-D", "-N", n])
        self._wait(self._nodes_idle, 60, "slurmd nodes did not become idle")
        return self

    def stop(self) -> None:
        # Reverse start order: nodes, controller, then munged (only if we started it).
        try:
            for name in reversed(list(self.procs)):
                p = self.procs[name]
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait(5)
            self.procs.clear()
        finally:
            self._release()  # after every daemon (munged included) is gone

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ------------------------------------------------------------------------------------------------
# A tiny but real `ds-cl train` run for launch tests: 2 short tasks, a 2-layer LLaMA built from
# a config, a SentencePiece tokenizer trained on the spot (under a second).

TINY_RUN = """\
output_dir: out
seed: 1
deepspeed: {deepspeed}
model:
  config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
           num_attention_heads: 2, num_key_value_heads: 2, vocab_size: 320, max_position_embeddings: 128}}
  tokenizer: tok.model
  dtype: float32
method: {{name: osft, osft: {{rank: fixed, ratio: 0.5}}}}
train: {{micro_batch_size: 2, global_batch_size: {global_batch}, max_seq_len: 64, max_steps_per_task: 2}}
eval: {{max_new_tokens: 2, batch_size: 8}}
output: {{export_each_task: false, plots: false}}
tasks:
  - {{name: colors, train: colors.jsonl, eval_size: 4}}
  - {{name: animals, train: animals.jsonl, eval_size: 4}}
"""


def write_tiny_run(folder: Path, deepspeed: str = "{zero_optimization: {stage: 3}}", global_batch: int = 4) -> Path:
    """Data, tokenizer and run config in `folder`; returns the config path (outputs go to folder/out)."""
    import json
    import random

    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    words = "alpha beta gamma delta red green blue cat dog fish one two three sun moon star".split()
    for task, labels in (("colors", ["red", "blue"]), ("animals", ["cat", "dog"])):
        with open(folder / f"{task}.jsonl", "w") as f:
            for i in range(16):
                text = " ".join(rnd.choice(words) for _ in range(5)) + f" {labels[i % 2]}"
                f.write(json.dumps({"input": text, "output": labels[i % 2]}) + "\n")
    sents = [" ".join(rnd.choice(words) for _ in range(8)) for _ in range(300)]
    sents += ["What is the topic of the following paragraph? Choose one from the option. Option: Answer:"] * 5
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_prefix=str(folder / "tok"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    cfg = folder / "run.yaml"
    cfg.write_text(TINY_RUN.format(deepspeed=deepspeed, global_batch=global_batch))
    return cfg

"""A real single-node Slurm for the tests: munged, slurmctld and slurmd started as root from a temp folder.

Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives under one folder made
with ``tempfile.mkdtemp`` in /tmp: pytest's own tmp folders are mode 700, and munged refuses a socket whose
folder others cannot traverse; a short path also keeps the unix socket under its 108-byte limit. Client
commands find the cluster through ``SLURM_CONF``, the daemons through ``-f``, and every Slurm component
finds munge through ``AuthInfo=socket=…``, so nothing is written to /etc/slurm or /etc/munge.

Partitions: ``partition`` (the default, up), ``down_partition`` (configured ``State=DOWN``: a job sent
there stays PENDING with reason ``PartitionDown``) and ``missing_partition`` (a name Slurm does not
know). A job asking for more CPUs than the node has also stays PENDING (reason ``PartitionConfig``), and
``--begin=now+1hour`` gives ``BeginTime``; all three were checked against Slurm 22.05.

When the kernel lets us (root with CAP_SYS_ADMIN), slurmd runs in its own mount namespace with an empty
tmpfs over ``node_hidden_dir``: the submitting process sees that folder's files, the compute node and its
jobs see an empty folder, exactly like a workspace on a disk the cluster's nodes do not mount.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
START_DEADLINE_S = 60.0


def why_unavailable() -> str | None:
    """The reason a Slurm cannot be started here, or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the Slurm tests start slurmctld/slurmd/munged and need root"
    missing = [c for c in DAEMONS + CLIENTS if shutil.which(c) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}); tests/ensure_slurm.sh installs it"
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError:
        return "the munge user is missing (reinstall the munge package: tests/ensure_slurm.sh)"
    return None


def _free_port() -> int:
    # Ask the kernel for a free port: two clusters (two test workers) must not share slurmctld's port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _wait(predicate, deadline_s: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value; raise naming ``what`` after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(interval)


def _can_hide_from_node(probe_dir: Path) -> bool:
    """True when a private mount namespace with a tmpfs can be made (root with CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None:
        return False
    probe_dir.mkdir(exist_ok=True)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs -o size=1m medart-probe '{probe_dir}'"],
                       capture_output=True, text=True, timeout=30)
    probe_dir.rmdir()
    return r.returncode == 0


@dataclass
class SlurmCluster:
    """A running single-node cluster; ``env`` is what a client needs (also set in ``os.environ``)."""

    root: Path
    conf: Path
    node: str
    cpus: int
    partition: str = "medart"
    down_partition: str = "medart_down"
    missing_partition: str = "no_such_partition"
    node_hidden_dir: Path | None = None
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **self.env})
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def squeue(self, job_id: str) -> tuple[str, str] | None:
        """(state, reason) as squeue shows them, or None once squeue no longer lists the job."""
        r = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T|%r", check=False)
        line = r.stdout.strip().splitlines()
        if r.returncode != 0 or not line:
            return None
        state, _, reason = line[0].partition("|")
        return state, reason

    def scontrol_show(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, ExitCode…); {} when Slurm forgot the job."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for token in r.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_state(self, job_id: str, states: set[str], deadline_s: float = 60.0) -> str:
        """Wait until scontrol reports one of ``states`` for the job; returns the state reached."""
        def reached() -> str | None:
            state = self.scontrol_show(job_id).get("JobState")
            return state if state in states else None

        return _wait(reached, deadline_s, f"job {job_id} to reach {sorted(states)}")

    def sbatch(self, *args: str) -> str:
        """Submit a raw sbatch job (``--parsable``); returns its id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(self.log_dir.glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"== {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left, stop the daemons by pid (slurmd, slurmctld, munged) and remove the folder."""
        if _alive(self.pids.get("slurmctld", -1)):
            left = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if left:
                self.run("scancel", *left, check=False)
                try:
                    _wait(lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip(),
                          20.0, "cancelled jobs to leave the queue", interval=0.2)
                except TimeoutError:
                    pass  # the daemons are stopped below either way
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            try:
                _wait(lambda: not _alive(pid), 15.0, f"{name} (pid {pid}) to exit")
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _slurm_conf(c: SlurmCluster, ctld_port: int, slurmd_port: int, mem_mb: int) -> str:
    r = c.root
    return f"""\
ClusterName=medart-test
SlurmctldHost={c.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
NodeName={c.node} NodeAddr=127.0.0.1 CPUs={c.cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={c.partition} Nodes={c.node} Default=YES MaxTime=INFINITE State=UP
PartitionName={c.down_partition} Nodes={c.node} MaxTime=INFINITE State=DOWN
"""


def _read_pid(path: Path, name: str) -> int:
    def pid() -> int | None:
        try:
            value = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return value if _alive(value) else None

    return _wait(pid, START_DEADLINE_S, f"{name} to write its pid file {path}")


def _start_munged(c: SlurmCluster) -> None:
    import pwd

    munge = pwd.getpwnam("munge")
    mdir = c.root / "munge"
    mdir.mkdir(mode=0o755)
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    for p in (mdir, key):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    # munged refuses to run as root with a key it does not own; it daemonizes once its socket is up.
    subprocess.run(["munged", f"--socket={mdir}/munge.socket", f"--key-file={key}",
                    f"--log-file={mdir}/munged.log", f"--pid-file={mdir}/munged.pid",
                    f"--seed-file={mdir}/munged.seed"],
                   user=munge.pw_uid, group=munge.pw_gid, check=True, capture_output=True, timeout=30)
    c.pids["munged"] = _read_pid(mdir / "munged.pid", "munged")


def _start_slurmd(c: SlurmCluster) -> None:
    cmd = ["slurmd", "-f", str(c.conf), "-N", c.node]
    hidden = c.root / "node-hidden"
    if _can_hide_from_node(hidden):
        hidden.mkdir()
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f"mount -t tmpfs -o size=16m medart-node-view '{hidden}' && exec \"$@\"", "sh", *cmd]
        c.node_hidden_dir = hidden
    subprocess.run(cmd, check=True, capture_output=True, timeout=60, env={**os.environ, **c.env})
    c.pids["slurmd"] = _read_pid(c.root / "slurmd.pid", "slurmd")


def start_cluster() -> SlurmCluster:
    """Start munged, slurmctld and slurmd; return once sinfo reports the node idle."""
    reason = why_unavailable()
    if reason:
        raise RuntimeError(reason)
    root = Path(tempfile.mkdtemp(prefix="medart-slurm-", dir="/tmp"))
    os.chmod(root, 0o755)
    node = socket.gethostname().split(".")[0]
    c = SlurmCluster(root=root, conf=root / "slurm.conf", node=node, cpus=os.cpu_count() or 1)
    try:
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir()
        # Below the machine's memory, or slurmd's self-check drains the node ("Low RealMemory").
        mem_mb = min(4096, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2)
        c.conf.write_text(_slurm_conf(c, _free_port(), _free_port(), mem_mb))
        _start_munged(c)
        env = {**os.environ, **c.env}
        subprocess.run(["slurmctld", "-f", str(c.conf)], check=True, capture_output=True, timeout=60, env=env)
        c.pids["slurmctld"] = _read_pid(root / "slurmctld.pid", "slurmctld")
        _start_slurmd(c)

        def idle() -> bool:
            r = c.run("sinfo", "-h", "-n", c.node, "-p", c.partition, "-o", "%t", check=False)
            return r.returncode == 0 and r.stdout.strip() == "idle"

        _wait(idle, START_DEADLINE_S, f"sinfo to report node {node} idle", interval=0.2)
    except BaseException as exc:
        logs = c.log_tails()
        c.stop()
        if isinstance(exc, (TimeoutError, subprocess.CalledProcessError, OSError)):
            detail = getattr(exc, "stderr", None) or ""
            raise RuntimeError(f"could not start the test Slurm: {exc} {detail}\n{logs}") from exc
        raise
    return c

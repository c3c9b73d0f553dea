"""Process identity: a pid plus its start time (pids are reused), zombies counting as gone, and signals sent
to a job's process group only after checking it is still the recorded process."""
from __future__ import annotations

import os
from pathlib import Path

_BOOT_ID: str | None = None


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``): a start time means nothing across reboots."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            _BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            _BOOT_ID = "noboot"
    return _BOOT_ID


def process_start_token(pid: int | None) -> str | None:
    """An identity of the live process ``pid`` that differs for any later process reusing the pid: the boot id
    and the start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``). None when there is no
    such process or it is a zombie (exited, not yet reaped)."""
    if not pid or pid <= 0:
        return None
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except OSError:
        data = ""
    if data:
        rest = data[data.rindex(")") + 2:].split()   # the command name may hold spaces and ')'
        if rest[0] in ("Z", "X"):
            return None
        return f"{boot_id()}:{rest[19]}"
    try:  # not Linux: psutil's create time (a gradio dependency)
        import psutil

        p = psutil.Process(int(pid))
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"ct:{p.create_time():.3f}"
    except Exception:
        return None


def process_alive(pid: int | None, token: str | None) -> bool:
    """True when ``pid`` is the very process whose start token was recorded."""
    return bool(pid) and token is not None and process_start_token(pid) == token


def signal_group(pid: int | None, token: str | None, sig: int) -> bool:
    """Send ``sig`` to the process group led by ``pid`` (jobs start their own session), after checking that
    ``pid`` is still the recorded process. Returns whether a signal was sent."""
    if not process_alive(pid, token):
        return False
    try:
        os.killpg(int(pid), sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False

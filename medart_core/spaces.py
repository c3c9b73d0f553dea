"""Where the studio runs and what that allows: a Hugging Face Space (ZeroGPU, a dedicated GPU, or CPU) or a
plain machine. (The restore from the durable folder that a start needs is :mod:`medart_core.startup`.)

Everything is read from the environment (``SPACE_ID`` with ``SYSTEM=spaces``, ``SPACES_ZERO_GPU``,
``MEDART_DURABLE_DIR``, ``HF_HUB_OFFLINE``) and the local machine; nothing here touches the network or
creates a CUDA context. ``torch.cuda.is_available()`` only asks the driver how many devices there are; the
device name and memory come from NVML or ``nvidia-smi`` (a context would hold hundreds of MB of the GPU that
a training job in another process needs). On ZeroGPU, torch.cuda is not touched at all: a GPU is attached
only inside ``@spaces.GPU`` calls, and initialising CUDA in the main process is refused there.

Off Spaces every rule here is a no-op: :func:`gpu_call` returns the function unchanged and
:func:`training_allowed` says yes.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .hub import is_offline

if TYPE_CHECKING:
    from .workspace import Workspace

ZERO_GPU_TRAINING_REASON = ("ZeroGPU gives a GPU per call, for seconds to minutes; a training run cannot live "
                            "there: use a dedicated-GPU Space or `python app.py` on a GPU machine")
# Durations handed to @spaces.GPU. ZeroGPU queues longer requests behind shorter ones and cuts a call at its
# duration, so each is sized for one batch of the work, not a whole job.
GENERATE_GPU_S = 120       # one generation batch at 512 px, PixArt-XL-2 (model moves to the GPU inside the call)
EVALUATE_GPU_S = 240       # feature extraction for one evaluation chunk
PIXART_BACKBONE = "PixArt-alpha/PixArt-XL-2-512x512"
_TRUE = {"1", "true", "yes", "on"}
# Filesystems on which SQLite's WAL (shared memory + POSIX locks across processes) is not safe.
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs", "fuse")

__all__ = ["GPUInfo", "Environment", "environment", "banner_text", "training_allowed", "gpu_call",
           "default_backbone", "offline_backbone", "ZERO_GPU_TRAINING_REASON",
           "GENERATE_GPU_S", "EVALUATE_GPU_S"]


@dataclass(frozen=True)
class GPUInfo:
    name: str
    memory_bytes: int | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.memory_bytes / 2 ** 30:.1f} GiB)" if self.memory_bytes else self.name


@dataclass(frozen=True)
class Environment:
    on_spaces: bool = False
    space_id: str | None = None
    zero_gpu: bool = False
    spaces_package: bool = False          # the `spaces` package (ZeroGPU's decorator) is importable
    cuda_available: bool = False
    gpus: tuple[GPUInfo, ...] = ()
    durable_dir: str | None = None        # MEDART_DURABLE_DIR (e.g. the mounted storage bucket)
    workspace: str | None = None
    workspace_fs: str | None = None       # filesystem type under the workspace (from /proc/mounts)
    hub_offline: bool = False             # HF_HUB_OFFLINE
    pixart_cached: bool = False           # PixArt-XL-2-512 is in the Hugging Face cache (preload_from_hub)
    notes: tuple[str, ...] = field(default=())

    @property
    def has_gpu(self) -> bool:
        """A GPU can run our work: a local CUDA device, or ZeroGPU's per-call one."""
        return self.zero_gpu or self.cuda_available

    @property
    def workspace_on_network_fs(self) -> bool:
        fs = (self.workspace_fs or "").lower()
        return fs.startswith(_NETWORK_FS)     # "fuse.*" covers bucket mounts (e.g. fuse.mountpoint-s3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = [asdict(g) for g in self.gpus]
        d["has_gpu"], d["workspace_on_network_fs"] = self.has_gpu, self.workspace_on_network_fs
        return d


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def on_spaces() -> bool:
    return bool(os.environ.get("SPACE_ID")) and os.environ.get("SYSTEM", "").strip().lower() == "spaces"


def is_zero_gpu() -> bool:
    """On a ZeroGPU Space (``SPACES_ZERO_GPU`` true); never off Spaces, whatever the variable says."""
    return on_spaces() and _flag("SPACES_ZERO_GPU")


def _parse_nvidia_smi(text: str) -> tuple[GPUInfo, ...]:
    """``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`` lines (memory in MiB)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, mem = line.rpartition(",")
        try:
            out.append(GPUInfo(name.strip(), int(float(mem.strip()) * 2 ** 20)))
        except ValueError:
            out.append(GPUInfo(line.strip()))
    return tuple(out)


def _nvidia_driver_possible() -> bool:
    """False only where we know there is no NVIDIA driver (Linux without ``/proc/driver/nvidia`` or
    ``/dev/nvidiactl``); True elsewhere, so torch is asked."""
    import sys

    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def _query_gpus() -> tuple[GPUInfo, ...]:
    """Device names and memory without a CUDA context: NVML if installed, else nvidia-smi; () if neither."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                gpus.append(GPUInfo(name.decode() if isinstance(name, bytes) else str(name),
                                    int(pynvml.nvmlDeviceGetMemoryInfo(h).total)))
            return tuple(gpus)
        finally:
            pynvml.nvmlShutdown()
    except Exception:   # not installed, or no driver: try the command line
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        res = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return _parse_nvidia_smi(res.stdout) if res.returncode == 0 else ()


def _torch_gpus(torch: Any) -> tuple[GPUInfo, ...]:
    """From torch, only when this process has initialised CUDA already (then asking costs nothing more)."""
    if not torch.cuda.is_initialized():
        return ()
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(GPUInfo(str(p.name), int(p.total_memory)))
    return tuple(out)


def _fs_type(path: str | os.PathLike) -> str | None:
    """The filesystem type of the mount holding ``path`` (the longest matching mount point in /proc/mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(Path(path).resolve())
    best, fs = -1, None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mp = parts[1].replace("\\040", " ")
        if (target == mp or target.startswith(mp.rstrip("/") + "/")) and len(mp) > best:
            best, fs = len(mp), parts[2]
    return fs


def _pixart_cached() -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(PIXART_BACKBONE, "model_index.json"), str)
    except Exception:
        return False


def _spaces_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("spaces") is not None


def environment(workspace: str | os.PathLike | None = None) -> Environment:
    """Where we run, read from the environment and the machine (no network, no CUDA context)."""
    spaces_on = on_spaces()
    zero = is_zero_gpu()
    cuda, gpus = False, ()
    notes: list[str] = []
    if zero:
        notes.append("ZeroGPU: a GPU is attached per call")
    elif not _nvidia_driver_possible():
        pass                     # no NVIDIA driver: CUDA cannot be there, and importing torch costs seconds
    else:
        import torch

        try:
            cuda = bool(torch.cuda.is_available())
        except Exception:
            cuda = False
        if cuda:
            gpus = _query_gpus() or _torch_gpus(torch)
            if not gpus:
                gpus = tuple(GPUInfo("CUDA device") for _ in range(max(1, torch.cuda.device_count())))
    ws = str(Path(workspace).resolve()) if workspace is not None else None
    return Environment(
        on_spaces=spaces_on,
        space_id=os.environ.get("SPACE_ID") if spaces_on else None,
        zero_gpu=zero,
        spaces_package=_spaces_importable() if spaces_on else False,
        cuda_available=cuda,
        gpus=gpus,
        durable_dir=os.environ.get("MEDART_DURABLE_DIR") or None,
        workspace=ws,
        workspace_fs=_fs_type(ws) if ws else None,
        hub_offline=is_offline(),
        pixart_cached=_pixart_cached() if (spaces_on and (zero or cuda)) else False,
        notes=tuple(notes),
    )


def training_allowed(env: Environment) -> tuple[bool, str]:
    """(may the studio start a fine-tuning job here, the one-line reason when not / a caveat when yes)."""
    if env.zero_gpu:
        return False, ZERO_GPU_TRAINING_REASON
    if not env.cuda_available:
        return True, "No GPU here: only the cpu-smoke preset finishes in reasonable time."
    return True, ""


def banner_text(env: Environment) -> str:
    """One line for the studio banner: where we run, the accelerator, where the durable copy goes."""
    where = f"Hugging Face Space {env.space_id}" if env.on_spaces else "Local machine"
    if env.zero_gpu:
        gpu = "ZeroGPU (a GPU per call for generation and evaluation; fine-tuning is off)"
        if not env.spaces_package:
            gpu += " — the `spaces` package is missing, so GPU calls run without a GPU"
    elif env.gpus:
        gpu = "GPU " + ", ".join(g.describe() for g in env.gpus)
    else:
        gpu = "CPU only"
    parts = [where, gpu]
    if env.durable_dir:
        parts.append(f"durable copy in {env.durable_dir}")
    elif env.on_spaces:
        parts.append("⚠ no durable folder: set MEDART_DURABLE_DIR to a mounted storage bucket, or captions, "
                     "votes and jobs are lost when the Space restarts")
    if env.workspace_on_network_fs:
        parts.append(f"⚠ the workspace is on a network filesystem ({env.workspace_fs}): keep MEDART_HOME on "
                     "local disk (SQLite WAL) and use MEDART_DURABLE_DIR for the mount")
    return " · ".join(parts)


def gpu_call(fn: Callable[..., Any], duration: int | float | Callable[..., int | float]) -> Callable[..., Any]:
    """``fn`` wrapped in ``spaces.GPU(duration=duration)`` on ZeroGPU (when the ``spaces`` package is there);
    ``fn`` itself anywhere else. ``duration`` is seconds, or a function of fn's arguments returning them.
    Wrap at import/build time: ZeroGPU registers its GPU functions before the app launches."""
    if not callable(duration) and not (isinstance(duration, (int, float)) and duration > 0):
        from .errors import ConfigError

        raise ConfigError(f"A GPU call needs a positive duration in seconds, got {duration!r}.")
    if not is_zero_gpu():
        return fn
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


@functools.lru_cache(maxsize=1)
def offline_backbone() -> str:
    """The embedded backbone that needs no download: ``demo`` when this build has it, else ``tiny``."""
    from . import backbone

    # The same test the loader makes before anything else (backbone._demo_dir); loading the weights here would
    # import diffusers and cost seconds of every studio start.
    return "demo" if (backbone.DEMO_DIR / "model_index.json").is_file() else "tiny"


def default_backbone(env: Environment) -> str:
    """PixArt-XL-2-512 on a GPU Space that can get it (Hub reachable or preloaded at build time); the
    embedded offline backbone everywhere else (it is labelled as random-weight in the studio)."""
    if env.on_spaces and env.has_gpu and (env.pixart_cached or not env.hub_offline):
        return PIXART_BACKBONE
    return offline_backbone()


def main(argv: list[str] | None = None) -> int:
    """``python -m medart_core.spaces [--workspace W]``: print what the studio detects here (the restore at
    start is ``python -m medart_core.startup``)."""
    import argparse
    import json

    from .workspace import Workspace

    p = argparse.ArgumentParser(prog="python -m medart_core.spaces", description=__doc__.splitlines()[0])
    p.add_argument("--workspace", "-w", default=None)
    args = p.parse_args(argv)
    env = environment(Workspace.open(args.workspace).root)
    print(banner_text(env))
    print(json.dumps(env.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

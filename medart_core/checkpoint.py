"""Everything a training run keeps on disk besides images: checkpoints (adapters, optimiser state, RNG
states, data position), the metrics log and the run status.

A checkpoint is ``runs/<run>/checkpoints/step_XXXXXX/`` (paths from ``workspace.RunLayout``): one
safetensors file per tensor group plus ``state.json`` written last, built in a ``.tmp-<pid>`` folder,
fsynced and renamed, so a crash never leaves a half checkpoint. Nothing is pickled: adapters, optimiser
tensors and RNG states are safetensors, everything else JSON.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, NotFoundError
from .fileio import atomic_write_text, fsync_dir, fsync_file
from .workspace import RunLayout, Workspace

if TYPE_CHECKING:  # pragma: no cover
    import torch

CHECKPOINT_FORMAT = 1


# =========================================================================================================
# Metrics log (appended, fsynced per line)
# =========================================================================================================
class MetricsLog:
    """``runs/<run>/metrics.jsonl``: one JSON object per line, flushed and fsynced as it is written, so a
    crash loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps the killed run did after its last checkpoint (they are redone)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
                continue  # a torn last line from the crash
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(ws: Workspace, run: str) -> list[dict[str, Any]]:
    """The metrics of a run (skipping a torn last line)."""
    p = ws.run_layout(run).metrics
    out = []
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def write_status(run_dir: Path, **fields_: Any) -> None:
    """Merge ``fields_`` into the run's status.json (atomically rewritten)."""
    p = RunLayout(Path(run_dir)).status
    cur: dict[str, Any] = {}
    if p.is_file():
        try:
            cur = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cur = {}
    cur.update(fields_, updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    atomic_write_text(p, json.dumps(cur, indent=2, sort_keys=True))


# =========================================================================================================
# RNG state (python, numpy, torch CPU, CUDA) as tensors, so it can be gathered across ranks and saved
# as safetensors without pickle
# =========================================================================================================
def rng_snapshot() -> dict[str, "torch.Tensor"]:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    snap = {
        "python_state": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss, 0.0 if gauss is None else 1.0],
                                     dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
        "numpy_misc": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state().clone(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["torch_cuda"] = torch.cuda.get_rng_state().clone()
    return snap


def rng_restore(snap: dict[str, "torch.Tensor"]) -> None:
    import numpy as np
    import torch

    has_gauss = bool(snap["python_gauss"][1].item())
    random.setstate((3, tuple(int(v) for v in snap["python_state"].tolist()),
                     float(snap["python_gauss"][0].item()) if has_gauss else None))
    pos, np_has_gauss = (int(v) for v in snap["numpy_misc"].tolist())
    np.random.set_state(("MT19937", snap["numpy_keys"].numpy().astype(np.uint32), pos, np_has_gauss,
                         float(snap["numpy_gauss"][0].item())))
    torch.set_rng_state(snap["torch_cpu"].to(torch.uint8).cpu())
    if "torch_cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state(snap["torch_cuda"].to(torch.uint8).cpu())


def gather_rng(accelerator: Any) -> dict[str, "torch.Tensor"]:
    """Every rank's RNG snapshot stacked along a leading rank dimension (a collective: all ranks call it)."""
    import torch

    snap = rng_snapshot()
    if accelerator.num_processes == 1:
        return {k: v.unsqueeze(0) for k, v in snap.items()}
    out = {}
    for k in sorted(snap):
        t = snap[k].unsqueeze(0)
        # Collectives do not take uint8 everywhere: ship byte states as int64 and cast back.
        wire = t if t.dtype in (torch.int64, torch.float64) else t.to(torch.int64)
        out[k] = accelerator.gather(wire.to(accelerator.device)).cpu().to(t.dtype)
    return out


# =========================================================================================================
# Optimizer state as safetensors tensors + JSON scalars
# =========================================================================================================
def optimizer_to_tensors(opt: Any) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    import torch

    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        entry: dict[str, Any] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                name = f"state.{idx}.{k}"
                tensors[name] = v.detach().to("cpu").contiguous().clone()
                entry[k] = {"tensor": name}
            else:
                entry[k] = {"value": v}
        state_meta[str(idx)] = entry
    groups = json.loads(json.dumps(sd["param_groups"]))  # tuples -> lists; fails loudly on non-JSON values
    return tensors, {"state": state_meta, "param_groups": groups}


def optimizer_from_tensors(opt: Any, tensors: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> None:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entry.items()}
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


# =========================================================================================================
# Checkpoints: runs/<run>/checkpoints/step_XXXXXX/, written to a .tmp-<pid> folder then renamed
# =========================================================================================================
def checkpoints_dir(run_dir: Path) -> Path:
    return RunLayout(Path(run_dir)).checkpoints_dir


def checkpoint_step(ck: Path) -> int:
    """The optimiser step of a checkpoint folder ``step_XXXXXX``."""
    return int(Path(ck).name[5:])


COMPLETE_MARKER = "COMPLETE"


def _is_complete(ck: Path) -> bool:
    """A checkpoint counts only when state.json is there, every file it lists has the listed size, and (when
    state.json names a completion marker, as every checkpoint written since issue 17 does) the marker is
    there: a shared filesystem can show the renamed folder before all of its files. Checkpoints of older
    versions name no marker and count by their files alone, so their runs still resume."""
    sj = ck / "state.json"
    if not sj.is_file():
        return False
    try:
        state = json.loads(sj.read_text(encoding="utf-8"))
        files_ok = all((ck / name).is_file() and (ck / name).stat().st_size == size
                       for name, size in state["files"].items())
        marker = state.get("complete_marker")
        return files_ok and (marker is None or (ck / str(marker)).is_file())
    except (OSError, json.JSONDecodeError, KeyError, AttributeError):
        return False


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first; leftover ``.tmp-*`` folders of crashed writes are ignored."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and ".tmp" not in p.name and p.name[5:].isdigit():
            if _is_complete(p):
                found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by the ``latest`` pointer, or (pointer missing/invalid) the newest complete one."""
    root = checkpoints_dir(run_dir)
    ptr = RunLayout(Path(run_dir)).latest_pointer
    if ptr.is_file():
        name = ptr.read_text(encoding="utf-8").strip()
        cand = root / name
        if name.startswith("step_") and "/" not in name and _is_complete(cand):
            return cand
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def find_checkpoint(ws: Workspace, run: str, step: int | None = None) -> Path:
    run_dir = ws.run_dir(run)
    if not run_dir.is_dir():
        raise NotFoundError(f"No run {run!r} in {ws.runs_dir}; list runs with `ls {ws.runs_dir}`.")
    if step is None:
        ck = latest_checkpoint(run_dir)
        if ck is None:
            raise NotFoundError(f"Run {run!r} has no complete checkpoint yet; train longer than checkpoint_every "
                                "steps or start it again.")
        return ck
    ck = RunLayout(run_dir).checkpoint(step)
    if not _is_complete(ck):
        have = [int(p.name[5:]) for p in list_checkpoints(run_dir)]
        raise NotFoundError(f"Run {run!r} has no complete checkpoint at step {step}; available steps: {have}.")
    return ck


def write_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, "torch.Tensor"]],
                     state: dict[str, Any], *, keep: int) -> Path:
    """Write ``<name>.safetensors`` for each entry of ``tensors`` plus ``state.json`` (written last) into
    ``step_XXXXXX.tmp-<pid>``, fsync, rename into place, then move the ``latest`` pointer and prune to the
    newest ``keep``. A crash at any point leaves the previous checkpoint and pointer valid."""
    from safetensors.torch import save_file

    layout = RunLayout(Path(run_dir))
    root = layout.checkpoints_dir
    root.mkdir(parents=True, exist_ok=True)
    final = layout.checkpoint(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for name, tdict in tensors.items():
        p = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tdict.items()}, str(p), metadata={"format": "pt"})
        fsync_file(p)
        files[p.name] = p.stat().st_size
    state = dict(state, files=files, format=CHECKPOINT_FORMAT, complete_marker=COMPLETE_MARKER)
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # a killed run wrote this step after its pointer's checkpoint: replace it whole
        old = root / f"{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
    # Written after the rename: a reader on another machine that sees the marker sees the whole folder.
    atomic_write_text(final / COMPLETE_MARKER, f"{step}\n")
    fsync_dir(final)
    atomic_write_text(layout.latest_pointer, final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(ck: Path) -> tuple[dict[str, Any], dict[str, dict[str, "torch.Tensor"]]]:
    """(state.json, {file stem: tensors}) of a complete checkpoint."""
    from safetensors.torch import load_file

    ck = Path(ck)
    if not _is_complete(ck):
        raise NotFoundError(f"{ck} is not a complete checkpoint (missing or truncated files).")
    state = json.loads((ck / "state.json").read_text(encoding="utf-8"))
    tensors = {Path(name).stem: load_file(str(ck / name)) for name in state["files"]}
    return state, tensors


def clean_tmp_dirs(run_dir: Path) -> None:
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


# =========================================================================================================
# Adapters (LoRA weights) as flat safetensors: "dit::<peft key>", "t5::<peft key>"
# =========================================================================================================
def adapter_tensors(backbone: Any) -> dict[str, "torch.Tensor"]:
    from .lora import lora_state_dict

    return {f"{part}::{k}": v.contiguous() for part, sd in lora_state_dict(backbone).items() for k, v in sd.items()}


def load_adapter_tensors(backbone: Any, flat: dict[str, "torch.Tensor"]) -> None:
    from .lora import load_lora_state_dict

    nested: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        part, _, key = k.partition("::")
        nested.setdefault(part, {})[key] = v
    load_lora_state_dict(backbone, nested)


# =========================================================================================================
# EMA weights of a run (issue 19 §1): which adapter file a checkpoint reference's ":WEIGHTS" names
# =========================================================================================================
EMA_FILE = "ema.safetensors"            # the classic EMA in a checkpoint folder, keyed like adapters.safetensors


def posthoc_dir(run_dir: Path) -> Path:
    """``runs/RUN/ema/``: the post-hoc EMA snapshots ``phema-*.safetensors`` of a run."""
    return Path(run_dir) / "ema"


def reconstructed_path(run_dir: Path, step: int, sigma_rel: float) -> Path:
    """Where ``ema reconstruct`` writes the EMA of relative std ``sigma_rel`` at ``step`` (named by the
    reference ``RUN@STEP:ema-<sigma_rel>``); a ``.json`` report sits beside it."""
    return posthoc_dir(run_dir) / "reconstructed" / f"step_{int(step):06d}-sigma_{float(sigma_rel):.4f}.safetensors"


def parse_weights(weights: str) -> tuple[str, float | None]:
    """``"raw"`` → ("raw", None); ``"ema"`` → ("ema", None); ``"ema-0.08"`` → ("posthoc", 0.08)."""
    w = (weights or "raw").strip()
    if w in ("raw", "ema"):
        return w, None
    head, _, sig = w.partition("-")
    if head == "ema" and sig:
        try:
            s = float(sig)
        except ValueError:
            s = -1.0
        if 0.0 < s < 1.0:
            return "posthoc", s
    raise ConfigError(f"Unknown weights {weights!r} after ':' in a checkpoint reference: use ':ema' (the EMA "
                      "kept while training) or ':ema-SIGMA' (a post-hoc EMA reconstructed with "
                      "`python -m medart_core ema reconstruct`, e.g. ':ema-0.08'); no suffix means the raw weights.")


def weights_file(ck: Path, weights: str) -> Path:
    """The adapters file of checkpoint folder ``ck`` for ``weights`` ("raw", "ema", "ema-SIGMA"); a
    ConfigError says how to get weights the run does not have."""
    ck = Path(ck)
    kind, sigma = parse_weights(weights)
    step = checkpoint_step(ck)
    run_dir = ck.parent.parent
    if kind == "raw":
        return ck / "adapters.safetensors"
    if kind == "ema":
        p = ck / EMA_FILE
        if not p.is_file():
            raise ConfigError(f"Checkpoint {run_dir.name}@{step} has no EMA weights: the run was trained without "
                              "--ema.decay. Use the raw weights (no ':ema'), or train with --ema.decay 0.999.")
        return p
    p = reconstructed_path(run_dir, step, float(sigma))
    if not p.is_file():
        how = ("reconstruct it with `python -m medart_core ema reconstruct --run "
               f"{run_dir.name} --sigma-rel {sigma:g} --step {step}`" if posthoc_dir(run_dir).is_dir()
               else "the run was trained without --ema.posthoc, so it has no snapshots to reconstruct from")
        raise ConfigError(f"Checkpoint {run_dir.name}@{step} has no post-hoc EMA of sigma_rel {sigma:g}: {how}.")
    return p



# =========================================================================================================
# Metrics log, read incrementally (the reader beside its writer, MetricsLog)
# =========================================================================================================
@dataclass
class MetricsSeries:
    """What a reader has taken from one ``metrics.jsonl`` so far: the train and validation series, the last
    figures (``step``, ``loss``, ``images_per_s``, ``peak_mem_mb``, ``val_loss``, ``validation_grid``), and a
    ``version`` that changes whenever new points arrive (or the file was rewritten)."""

    inode: int = -1
    offset: int = 0
    step: list[int] = field(default_factory=list)
    latent: list[float | None] = field(default_factory=list)
    color: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    version: int = 0

    def add(self, r: dict[str, Any]) -> None:
        """One parsed line of the log."""
        step = int(r.get("step", 0))
        if "val_loss" in r:
            # A run with no held-out images (val_images=0) logs its grids with val_loss null.
            v = r["val_loss"]
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.val.append((step, float(v)))
            self.last["val_loss"], self.last["validation_grid"] = v, r.get("validation_grid")
            return
        if "loss_latent" in r:
            self.step.append(step)
            self.latent.append(r.get("loss_latent"))
            if "loss_color" in r:
                self.color.append((step, float(r["loss_color"])))
            self.last.update({k: r.get(k) for k in ("step", "loss", "images_per_s", "peak_mem_mb")})


class MetricsFollower:
    """``runs/<run>/metrics.jsonl`` read from where the last call stopped, shared by every reader of a process
    (the file is append-only while a run trains; a resume rewrites it, which a new inode or a shorter file
    reveals, and it is then re-read). A call with nothing new costs one ``stat``."""

    def __init__(self) -> None:
        self._runs: dict[str, MetricsSeries] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> MetricsSeries:
        key = str(path)
        with self._lock:
            s = self._runs.setdefault(key, MetricsSeries())
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if s.offset:
                    self._runs[key] = s = MetricsSeries(version=s.version + 1)
                return s
            if st.st_ino != s.inode or st.st_size < s.offset:
                s = self._runs[key] = MetricsSeries(inode=st.st_ino, version=s.version + 1)
            if st.st_size == s.offset:
                return s
            with open(path, "rb") as f:
                f.seek(s.offset)
                chunk = f.read(st.st_size - s.offset)
            end = chunk.rfind(b"\n") + 1          # a torn last line waits for the next call
            if end == 0:
                return s
            s.offset += end
            for line in chunk[:end].splitlines():
                try:
                    s.add(json.loads(line))
                except json.JSONDecodeError:
                    continue
            s.version += 1
            return s

"""Feature cache: T5 embeddings (+ mask) and VAE latent posteriors computed once, reused every step.

Only valid while T5 and the VAE encoder are frozen (the trainer refuses it when T5 has LoRA). It removes
the T5 and VAE-encoder forward passes from every training step.

Layout, under ``ws.feature_cache_dir(<key>)`` where ``<key>`` hashes (backbone spec + weight fingerprint,
resolution, dtype, crop, token length, format)::

    index.json                    {"format", "key", "shards": {name: {size, sha256}}, "entries": {...}}
    shard-<n>-<rand>.safetensors  tensors "<entry>.latent_mean|latent_std|prompt_embeds|prompt_mask"

An entry's key hashes (image pixel hash, caption version, caption text), so a new caption version or an
edited image is simply a *missing* entry. :meth:`FeatureCache.ensure` runs before step 0: it checks every
shard the index names (present, same size, same sha256; a truncated or altered shard drops its entries),
computes what is missing in one pass, and writes new shards then the index atomically. So a stale or
incomplete cache can never surface at step N.

Crop: with the cache the trainer uses the deterministic **center** crop (the latents of a random crop
would differ every epoch); the paper's random crop is kept for uncached runs. The run's provenance
records which one was used. Latents are stored as the VAE posterior's mean and std so the trainer still
draws a posterior sample each step, as the uncached path does.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .constants import MAX_TOKENS
from .errors import StaleCacheError
from .fileio import atomic_path, atomic_write_text, sha256_bytes, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

CACHE_FORMAT = 1
SHARD_ENTRIES = 256
_FIELDS = ("latent_mean", "latent_std", "prompt_embeds", "prompt_mask")


@dataclass(frozen=True)
class CacheItem:
    """What identifies one cached training example."""

    image_path: Path
    pixel_hash: str
    caption_version: str
    text: str

    @property
    def entry(self) -> str:
        return sha256_bytes(f"{self.pixel_hash}\x00{self.caption_version}\x00{self.text}".encode("utf-8"))[:40]


def cache_item(example: Any) -> CacheItem:
    """A CacheItem from an examples.Example (anything with path, pixel_hash, caption_version, text)."""
    return CacheItem(Path(example.path), str(example.pixel_hash), str(example.caption_version), str(example.text))


@dataclass
class CacheReport:
    cache_dir: str
    entries_needed: int
    hits: int
    built: int
    dropped_shards: list[str] = field(default_factory=list)   # shards found truncated/altered and removed
    seconds: float = 0.0
    crop: str = "center"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weights_fingerprint(spec: str) -> str:
    """Something that changes when a local backbone folder's T5/VAE files change (size + mtime); hub ids
    and the seeded tiny/small backbones are identified by their spec alone."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        return spec
    parts = [str(folder.resolve())]
    for sub in ("text_encoder", "vae", "tokenizer"):
        d = folder / sub
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    parts.append(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}")
    return sha256_bytes("".join(parts).encode())


class FeatureCache:
    """T5/VAE features of (image, caption) pairs for one (backbone, resolution, dtype); see module doc."""

    def __init__(self, ws: Any, *, backbone_spec: str, resolution: int, dtype: str = "fp32",
                 max_tokens: int = MAX_TOKENS):
        if dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"cache dtype must be fp32, bf16 or fp16, got {dtype!r}")
        self.key = {"format": CACHE_FORMAT, "backbone": backbone_spec, "weights": weights_fingerprint(backbone_spec),
                    "resolution": int(resolution), "dtype": dtype, "crop": "center", "max_tokens": int(max_tokens),
                    "lowercase": True}
        digest = sha256_bytes(json.dumps(self.key, sort_keys=True).encode())[:24]
        self.dir = ws.feature_cache_dir(f"feat-{digest}")
        self.resolution = int(resolution)
        self.dtype = dtype
        self.max_tokens = int(max_tokens)
        self._index: dict[str, Any] | None = None
        self._handles: dict[str, Any] = {}

    # ---- index ------------------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.dir / "index.json"

    def _read_index(self) -> dict[str, Any]:
        empty = {"format": CACHE_FORMAT, "key": self.key, "shards": {}, "entries": {}}
        if not self.index_path.is_file():
            return empty
        try:
            idx = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return empty   # an unreadable index: everything is rebuilt
        if idx.get("key") != self.key:
            return empty
        return idx

    def _write_index(self, idx: dict[str, Any]) -> None:
        atomic_write_text(self.index_path, json.dumps(idx, sort_keys=True))

    def verify(self, items: Sequence[CacheItem]) -> tuple[dict[str, Any], list[CacheItem], list[str]]:
        """(cleaned index, items without a valid entry, names of shards that failed their check)."""
        idx = self._read_index()
        bad = []
        for name, meta in list(idx["shards"].items()):
            p = self.dir / name
            ok = p.is_file() and p.stat().st_size == meta.get("size") and sha256_file(p) == meta.get("sha256")
            if not ok:
                bad.append(name)
                del idx["shards"][name]
        idx["entries"] = {k: v for k, v in idx["entries"].items() if v.get("shard") in idx["shards"]}
        missing, seen = [], set()
        for it in items:
            if it.entry not in idx["entries"] and it.entry not in seen:
                missing.append(it)
                seen.add(it.entry)
        return idx, missing, bad

    # ---- build ------------------------------------------------------------------------------------------
    def _compute(self, backbone: Any, items: Sequence[CacheItem]) -> dict[str, "torch.Tensor"]:
        import torch

        from .pixart import encode_prompts, tokenize_prompts
        from .examples import load_pixels

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]
        vae = backbone.vae
        px = torch.stack([load_pixels(it.image_path, self.resolution, crop="center") for it in items])
        ids, mask = tokenize_prompts(backbone.tokenizer, [it.text for it in items], max_length=self.max_tokens)
        with torch.no_grad():
            dist = vae.encode(px.to(vae.device, vae.dtype)).latent_dist
            emb, m = encode_prompts(backbone, ids, mask)
        out = {}
        for i, it in enumerate(items):
            out[f"{it.entry}.latent_mean"] = dist.mean[i].to("cpu", dt).contiguous()
            out[f"{it.entry}.latent_std"] = dist.std[i].to("cpu", dt).contiguous()
            out[f"{it.entry}.prompt_embeds"] = emb[i].to("cpu", dt).contiguous()
            out[f"{it.entry}.prompt_mask"] = m[i].to("cpu", torch.int64).contiguous()
        return out

    def build(self, backbone: Any, idx: dict[str, Any], missing: Sequence[CacheItem], *, batch_size: int = 8,
              log: Callable[[str], None] | None = None) -> int:
        """Compute ``missing`` entries into new shards; the index is rewritten after each shard."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        done = 0
        for s in range(0, len(missing), SHARD_ENTRIES):
            chunk = missing[s:s + SHARD_ENTRIES]
            tensors: dict[str, Any] = {}
            for b in range(0, len(chunk), batch_size):
                tensors.update(self._compute(backbone, chunk[b:b + batch_size]))
            name = f"shard-{len(idx['shards']):05d}-{secrets.token_hex(4)}.safetensors"
            with atomic_path(self.dir / name) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
            idx["shards"][name] = {"size": (self.dir / name).stat().st_size, "sha256": sha256_file(self.dir / name)}
            for it in chunk:
                idx["entries"][it.entry] = {"shard": name, "pixel_hash": it.pixel_hash,
                                            "caption_version": it.caption_version}
            self._write_index(idx)
            done += len(chunk)
            if log:
                log(f"feature cache: {done}/{len(missing)} entries computed")
        return done

    def ensure(self, backbone: Any | None, items: Sequence[CacheItem], *, build: bool = True, batch_size: int = 8,
               log: Callable[[str], None] | None = None) -> CacheReport:
        """Verify the cache for ``items`` and compute what is missing or stale (``build=False``: raise
        StaleCacheError instead). Call before step 0; afterwards :meth:`load` never misses."""
        import time

        t0 = time.perf_counter()
        self._close()
        idx, missing, bad = self.verify(items)
        for name in bad:
            (self.dir / name).unlink(missing_ok=True)
        if bad and log:
            log(f"feature cache: dropped {len(bad)} damaged shard(s) {bad}; their entries are recomputed")
        needed = len({it.entry for it in items})
        if missing and not build:
            raise StaleCacheError(f"The feature cache {self.dir} lacks {len(missing)} of {needed} entries (new or "
                                  "changed captions/images, or a damaged shard); rebuild it with "
                                  "FeatureCache.ensure(..., build=True) before training.")
        built = self.build(backbone, idx, missing, batch_size=batch_size, log=log) if missing else 0
        if bad and not missing:
            self._write_index(idx)
        self._index = idx
        return CacheReport(cache_dir=str(self.dir), entries_needed=needed, hits=needed - len(missing), built=built,
                           dropped_shards=bad, seconds=round(time.perf_counter() - t0, 3))

    # ---- read -------------------------------------------------------------------------------------------
    def load(self, item: CacheItem) -> dict[str, "torch.Tensor"]:
        """The four tensors of an entry (CPU): latent_mean/std [4, h, w], prompt_embeds [120, D], prompt_mask [120]."""
        from safetensors import safe_open

        if self._index is None:
            self._index = self._read_index()
        meta = self._index["entries"].get(item.entry)
        if meta is None:
            raise StaleCacheError(f"No cache entry for {item.image_path.name} (caption version "
                                  f"{item.caption_version}); run FeatureCache.ensure before training.")
        shard = meta["shard"]
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(self.dir / shard), framework="pt", device="cpu")
        return {f: h.get_tensor(f"{item.entry}.{f}") for f in _FIELDS}

    def _close(self) -> None:
        self._handles.clear()
        self._index = None

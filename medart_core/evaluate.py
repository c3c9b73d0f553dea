"""Evaluation you can trust across checkpoints: the protocol (``MetricProfile``) recorded with every number,
real features cached, evaluation images seed-matched across checkpoints, and results that refuse to be
compared when they were measured differently.

The flow of ``evaluate()``: ``build_eval_set`` (per class, real images and their approved captions, one
fixed seed per prompt) → real features (cached by dataset, split, classes, pixel hashes, extractor and
preprocessing) → for each checkpoint the evaluation images (generated once per (checkpoint, prompt, seed,
sampler) and reused) → their features → ``metrics`` (FID/FD, KID, PRDC, overall and per class, bootstrap
interval) → a result JSON under ``W/evaluations/``, with its per-image features beside it (what
:func:`compare_paired` resamples to compare two checkpoints paired). Downstream utility (a classifier trained on real,
synthetic or both, tested on real) and a memorisation check complete the paper's measures.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import metrics as M
from . import provenance
from .errors import ConfigError, NotFoundError, ProfileMismatchError
from .extractors import PREPARATION, Extractor, ModuleExtractor, images_to_uint8
from .fileio import atomic_write, atomic_write_bytes, atomic_write_text, sha256_bytes
from .seeds import derive_seed
from .workspace import Workspace, validate_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

EVAL_FORMAT = 1
# Fields of a profile that may differ between results that are still compared: they name what is compared.
PER_RESULT = ("checkpoint", "checkpoint_sha256", "created_at")


# =========================================================================================================
# What is measured: the evaluation set and the protocol
# =========================================================================================================
@dataclass(frozen=True)
class EvalItem:
    key: str            # "img-<id>"
    label: str
    path: Path
    pixel_hash: str
    prompt: str         # the image's caption: its generated twin is drawn from this prompt
    seed: int           # fixed per prompt: every checkpoint draws the same noise for it


@dataclass
class EvalSpec:
    """What to evaluate and how; everything here ends up in the MetricProfile."""

    dataset: str = "sample"
    classes: list[str] | None = None        # None: every class
    per_class: int = 16                     # real images per class (all if fewer)
    captions: str = "approved"              # "approved" | "latest" (prompts for the generated twins)
    caption_text: str = "caption"           # the twins' prompt: the caption | the class seed caption | ""
    per_image: int = 1                      # generated twins per real image
    extractor: str = "domain"               # inception | dinov2 | domain | custom
    extractor_weights: str | None = None    # inception weights file, DINOv2 Hub id or folder
    extractor_dataset: str | None = None    # the domain classifier's dataset (None: ``dataset``)
    extractor_epochs: int = 30              # the domain classifier's training epochs
    size: int = 64                          # preparation size S (see extractors.PREPARATION)
    seed: int = 0
    steps: int = 20
    guidance: float = 4.5
    negative_prompt: str = ""
    adapter_strength: float = 1.0
    kid_subsets: int = 100
    n_boot: int = 50
    prdc_k: int = 5
    min_samples: int = 50
    precision: str | None = None            # generation: fp32 | bf16 | auto | None (device default: bf16 on a
                                            # GPU, fp32 on a CPU); the profile records the one used

    def __post_init__(self) -> None:
        from .precision import validate_precision

        validate_precision(self.precision, "evaluation precision")
        if self.caption_text not in PROMPT_SETS:
            raise ConfigError(f"caption_text must be one of {sorted(PROMPT_SETS)}, got {self.caption_text!r}.")
        if int(self.per_image) < 1 or int(self.extractor_epochs) < 1:
            raise ConfigError(f"per_image and extractor_epochs must be >= 1, got {self.per_image} and "
                              f"{self.extractor_epochs}.")


# What the generated twins are prompted with (EvalSpec.caption_text), as the profile names it.
PROMPT_SETS = {"caption": "each real image's caption", "class": "each real image's class seed caption",
               "empty": "the empty prompt"}


@dataclass
class EvalSet:
    dataset: str
    items: list[EvalItem]

    @property
    def classes(self) -> list[str]:
        return sorted({it.label for it in self.items})

    def digest(self) -> str:
        return sha256_bytes("".join(f"{it.key}\t{it.label}\t{it.pixel_hash}\t{it.seed}\t{it.prompt}\n"
                                    for it in self.items).encode())

    def plan(self, spec: "EvalSpec") -> list[tuple[int, str, int]]:
        """(real image index, prompt, seed) of every generated twin, image by image: the image's own seed,
        then ``derive_seed(spec.seed, 'eval-seed', pixel hash, k)`` for its k-th extra twin."""
        return [(i, it.prompt, it.seed if k == 0 else derive_seed(spec.seed, "eval-seed", it.pixel_hash, k, bits=31))
                for i, it in enumerate(self.items) for k in range(int(spec.per_image))]


def build_eval_set(ws: Workspace, store: Any, spec: EvalSpec) -> EvalSet:
    """Per class, up to ``per_class`` real images with a caption (seeded choice), each with a fixed seed."""
    import torch

    validate_name(spec.dataset, "dataset name")
    status = "approved" if spec.captions == "approved" else None
    states = {s.image_id: s for s in store.states(spec.dataset, status=status) if s.text and s.text.strip()}
    if not states:
        raise ConfigError(f"Dataset {spec.dataset!r} has no {'approved ' if status else ''}captions to prompt the "
                          "evaluation images with; approve captions first or use captions='latest'.")
    by_class: dict[str, list[Any]] = {}
    for rec in store.list_images(spec.dataset):
        if rec.id in states and (spec.classes is None or rec.label in spec.classes):
            by_class.setdefault(rec.label, []).append(rec)
    if spec.classes:
        missing = sorted(set(spec.classes) - set(by_class))
        if missing:
            raise NotFoundError(f"No captioned images of class(es) {missing} in {spec.dataset!r}.")
    from .examples import class_seed_caption

    items = []
    for label in sorted(by_class):
        recs = sorted(by_class[label], key=lambda r: r.id)
        class_prompt = class_seed_caption(store, spec.dataset, label) if spec.caption_text == "class" else ""
        order = torch.randperm(len(recs), generator=torch.Generator().manual_seed(
            derive_seed(spec.seed, "eval-set", label))).tolist()
        for i in sorted(order[: spec.per_class]):
            r = recs[i]
            items.append(EvalItem(key=f"img-{r.id}", label=label, path=ws.image_path(spec.dataset, r.file_name),
                                  pixel_hash=r.pixel_hash,
                                  prompt=states[r.id].text if spec.caption_text == "caption" else class_prompt,
                                  seed=derive_seed(spec.seed, "eval-seed", r.pixel_hash, bits=31)))
    return EvalSet(dataset=spec.dataset, items=items)


EVAL_PACKAGES = ("torch", "torchmetrics", "torch-fidelity", "transformers", "diffusers", "pillow")


def package_versions() -> dict[str, str]:
    return provenance.package_versions(EVAL_PACKAGES, python=False)


def make_profile(spec: EvalSpec, eval_set: EvalSet, extractor: Extractor, *, checkpoint: str,
                 checkpoint_sha256: str, backbone: str, sampler: str = "DPM-Solver++(2M)",
                 precision: str = "fp32") -> dict[str, Any]:
    """The full protocol of one result. Two results are comparable when they agree on everything except
    PER_RESULT fields. ``precision`` (what the images were generated in) is recorded only when it is not
    fp32, and the settings below (:func:`_optional_settings`) only when they are not their defaults, so results
    measured before they were settings stay comparable."""
    return {**({"precision": precision} if precision != "fp32" else {}),
        **_optional_settings(spec),
        **extractor.describe(),
        "preparation": PREPARATION, "size": spec.size, "image_format": "png",
        "n_real": len(eval_set.items), "n_generated": len(eval_set.items) * int(spec.per_image),
        "dataset": eval_set.dataset, "real_split": f"per class up to {spec.per_class} (seed {spec.seed})",
        "classes": eval_set.classes, "eval_set_sha256": eval_set.digest(), "captions": spec.captions,
        "prompt_set": PROMPT_SETS[spec.caption_text],
        "seeds": f"derive_seed({spec.seed}, 'eval-seed', pixel hash)"
                 + (f", then (…, k) for twins k=1..{int(spec.per_image) - 1}" if spec.per_image > 1 else ""),
        "sampler": sampler, "steps": spec.steps, "guidance": spec.guidance, "negative_prompt": spec.negative_prompt,
        "adapter_strength": spec.adapter_strength, "backbone": backbone,
        "kid": {"subsets": spec.kid_subsets, "subset_size": "min(1000, N)", "kernel": "(x.y/d + 1)^3"},
        "prdc_k": spec.prdc_k, "bootstrap": spec.n_boot, "packages": package_versions(),
        "checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _optional_settings(spec: EvalSpec) -> dict[str, Any]:
    """The profile fields of settings that are recorded only away from their defaults (read back by
    :func:`spec_from_profile`); the domain classifier's training only matters for the domain extractor."""
    out: dict[str, Any] = {}
    if spec.caption_text != "caption":
        out["caption_text"] = spec.caption_text
    if spec.per_image != 1:
        out["per_image"] = int(spec.per_image)
    if spec.extractor == "domain":
        if spec.extractor_dataset not in (None, spec.dataset):
            out["extractor_dataset"] = spec.extractor_dataset
        if spec.extractor_epochs != 30:
            out["extractor_epochs"] = int(spec.extractor_epochs)
    return out


def profile_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Why two profiles may not be compared (empty when they may). Package versions count: a new torch can
    move the numbers."""
    keys = sorted((set(a) | set(b)) - set(PER_RESULT))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def require_comparable(profiles: Sequence[dict[str, Any]]) -> None:
    for p in profiles[1:]:
        diff = profile_mismatch(profiles[0], p)
        if diff:
            raise ProfileMismatchError(
                f"{p.get('checkpoint')} was measured differently from {profiles[0].get('checkpoint')} "
                f"({'; '.join(diff[:3])}{'; …' if len(diff) > 3 else ''}); re-evaluate both with one profile.")


# =========================================================================================================
# Features, with the real-feature cache
# =========================================================================================================
def load_images(paths: Sequence[Path]) -> list[Any]:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def real_feature_key(eval_set: EvalSet, extractor: Extractor, size: int) -> str:
    return sha256_bytes(json.dumps({
        "dataset": eval_set.dataset, "items": [[it.key, it.label, it.pixel_hash] for it in eval_set.items],
        "extractor": extractor.describe(), "preparation": PREPARATION, "size": size, "format": EVAL_FORMAT,
    }, sort_keys=True).encode())[:40]


def real_features(ws: Workspace, eval_set: EvalSet, extractor: Extractor, size: int) -> "torch.Tensor":
    """Features of the real images, computed once per (dataset, images, extractor, preparation)."""
    from safetensors.torch import load_file, save

    path = ws.cache_dir / "real-features" / f"{real_feature_key(eval_set, extractor, size)}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["features"]
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    feats = extractor.features(images_to_uint8(load_images([it.path for it in eval_set.items]), size))
    atomic_write_bytes(path, save({"features": feats.contiguous()}))
    return feats


# =========================================================================================================
# Metrics of one feature pair, overall and per class
# =========================================================================================================
def score(real: "torch.Tensor", fake: "torch.Tensor", labels: Sequence[str], spec: EvalSpec,
          fake_labels: Sequence[str] | None = None) -> dict[str, Any]:
    """FID/FD with a bootstrap interval, KID mean ± std, PRDC; overall and per class (where a class has the
    samples a metric needs); with sample-size warnings. ``fake_labels``: the class of each generated image
    when there are not one per real image (default: ``labels``)."""
    import torch

    def one(r: "torch.Tensor", f: "torch.Tensor", boot: int) -> dict[str, Any]:
        out: dict[str, Any] = {"n": int(r.shape[0])}
        if r.shape[0] < 2:
            out["skipped"] = "fewer than 2 images"
            return out
        out["fd"] = M.frechet_distance(r, f)
        if boot:
            out["fd_ci"] = list(M.bootstrap_ci(r, f, M.frechet_distance, n_boot=boot, seed=spec.seed))
        kid = M.kernel_inception_distance(r, f, n_subsets=spec.kid_subsets, seed=spec.seed)
        out["kid"], out["kid_std"], out["kid_subset_size"] = kid.mean, kid.std, kid.subset_size
        if r.shape[0] > spec.prdc_k:
            out.update(M.prdc(r, f, k=spec.prdc_k))
        return out

    overall = one(real, fake, spec.n_boot)
    overall["warnings"] = M.sample_size_warnings(real.shape[0], fake.shape[0], real.shape[1],
                                                 minimum=spec.min_samples)
    per_class = {}
    lab = list(labels)
    fake_lab = lab if fake_labels is None else list(fake_labels)
    for c in sorted(set(lab)):
        idx = torch.tensor([i for i, x in enumerate(lab) if x == c])
        fidx = torch.tensor([i for i, x in enumerate(fake_lab) if x == c])
        per_class[c] = one(real[idx], fake[fidx], 0)
    return {"overall": overall, "per_class": per_class}


# =========================================================================================================
# The domain classifier (features for the domain FD; also the downstream-utility classifier)
# =========================================================================================================
def _small_cnn(n_classes: int) -> Any:
    import torch.nn as nn

    def block(i: int, o: int) -> list[Any]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    features = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.Conv2d(64, 64, 3, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(features, nn.Linear(64, n_classes))


def train_classifier(images: "torch.Tensor", labels: Sequence[int], n_classes: int, *, seed: int = 0,
                     epochs: int = 30, batch_size: int = 32, lr: float = 3e-3) -> Any:
    """A small CNN on uint8 [N,3,S,S] images (flips as augmentation), trained deterministically from ``seed``."""
    import torch

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = _small_cnn(n_classes)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        x = images.float() / 255.0
        y = torch.as_tensor(list(labels), dtype=torch.int64)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0], generator=gen)
            for i in range(0, x.shape[0], batch_size):
                b = perm[i:i + batch_size]
                xb = x[b]
                flip = torch.rand(xb.shape[0], generator=gen) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                loss = torch.nn.functional.cross_entropy(net(xb), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
    finally:
        torch.random.set_rng_state(state)
    return net


def domain_extractor(ws: Workspace, store: Any, dataset: str, *, size: int = 64, seed: int = 0,
                     epochs: int = 30) -> "DomainExtractor":
    """The penultimate features of a classifier trained on the dataset's labelled real images (cached in the
    workspace by the images' pixel hashes, labels, size, seed and epochs)."""
    from safetensors.torch import load_file, save

    recs = sorted(store.list_images(dataset), key=lambda r: r.id)
    classes = sorted({r.label for r in recs})
    if len(classes) < 2:
        raise ConfigError(f"The domain extractor needs a dataset with at least 2 labelled classes; {dataset!r} "
                          f"has {classes}. Use --extractor inception or dinov2.")
    key = sha256_bytes(json.dumps([[r.pixel_hash, r.label] for r in recs] + [size, seed, epochs, EVAL_FORMAT])
                       .encode())[:40]
    path = ws.cache_dir / "domain-classifier" / f"{key}.safetensors"
    net = _small_cnn(len(classes))
    if path.is_file():
        net.load_state_dict(load_file(str(path)))
    else:
        x = images_to_uint8(load_images([ws.image_path(dataset, r.file_name) for r in recs]), size)
        net = train_classifier(x, [classes.index(r.label) for r in recs], len(classes), seed=seed, epochs=epochs)
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in net.state_dict().items()}))
    net.eval()
    return DomainExtractor(net, classes)


class DomainExtractor(ModuleExtractor):
    """The domain classifier's penultimate features; keeps the whole classifier and its class names (the
    downstream-utility checks classify with it)."""

    def __init__(self, classifier: Any, classes: Sequence[str]):
        super().__init__(classifier[0], name="domain", layer="penultimate (64) of the domain classifier", dim=64)
        self.classifier, self.classes = classifier, list(classes)


def make_extractor(ws: Workspace, store: Any, spec: EvalSpec, *, module: Any = None) -> Extractor:
    from .extractors import Dinov2Extractor, InceptionExtractor

    if spec.extractor == "inception":
        return InceptionExtractor(spec.extractor_weights)
    if spec.extractor == "dinov2":
        return Dinov2Extractor(spec.extractor_weights)
    if spec.extractor == "domain":
        return domain_extractor(ws, store, spec.extractor_dataset or spec.dataset, size=spec.size, seed=spec.seed,
                                epochs=spec.extractor_epochs)
    if spec.extractor == "custom":
        if module is None:
            raise ConfigError("extractor 'custom' needs a module (library use only).")
        return ModuleExtractor(module, uint8_input=True)
    raise ConfigError(f"extractor must be inception, dinov2, domain or custom, got {spec.extractor!r}.")


# =========================================================================================================
# Downstream utility and memorisation
# =========================================================================================================
def downstream_utility(real_train: "torch.Tensor", y_train: Sequence[int], synth: "torch.Tensor",
                       y_synth: Sequence[int], real_test: "torch.Tensor", y_test: Sequence[int], n_classes: int,
                       *, seed: int = 0, epochs: int = 30) -> dict[str, Any]:
    """Accuracy and balanced accuracy on real test images of classifiers trained on real, synthetic and both
    (uint8 image tensors), each with a 95 % Wilson interval on accuracy."""
    import torch

    out = {}
    sets = {"real": (real_train, list(y_train)), "synthetic": (synth, list(y_synth)),
            "real+synthetic": (torch.cat([real_train, synth]), list(y_train) + list(y_synth))}
    yt = torch.as_tensor(list(y_test))
    for name, (x, y) in sets.items():
        net = train_classifier(x, y, n_classes, seed=seed, epochs=epochs)
        with torch.no_grad():
            pred = net(real_test.float() / 255.0).argmax(1)
        correct = int((pred == yt).sum())
        per_class = [float((pred[yt == c] == c).double().mean()) for c in range(n_classes) if (yt == c).any()]
        out[name] = {"accuracy": correct / len(yt), "accuracy_ci": list(M.proportion_ci(correct, len(yt))),
                     "balanced_accuracy": sum(per_class) / len(per_class), "n_train": len(y), "n_test": len(yt)}
    return out


def nearest_training_images(fake: "torch.Tensor", train: "torch.Tensor", *, threshold: float = 0.95
                            ) -> dict[str, Any]:
    """For each generated image the most similar training image (cosine similarity of features); images
    above ``threshold`` are flagged as possible copies."""
    import torch

    f = torch.nn.functional.normalize(fake.double(), dim=1)
    t = torch.nn.functional.normalize(train.double(), dim=1)
    sim = f @ t.T
    best, idx = sim.max(dim=1)
    flagged = [i for i, s in enumerate(best.tolist()) if s >= threshold]
    return {"similarity": best.tolist(), "nearest": idx.tolist(), "median": float(best.median()),
            "flagged": flagged, "threshold": threshold}


# =========================================================================================================
# Evaluation of checkpoints
# =========================================================================================================
@dataclass
class EvalResult:
    id: str
    profile: dict[str, Any]
    metrics: dict[str, Any]
    images: list[str] = field(default_factory=list)     # generated image paths, in eval-set order
    memorisation: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# A function that returns, for one checkpoint, the PNG paths of images generated from (prompt, seed) pairs.
ImageSource = Callable[[str, list[str], list[int]], list[Path]]


@dataclass
class RealReference:
    """The real side of an evaluation, prepared once for any number of checkpoints: the eval set, the
    extractor and the real images' features."""

    spec: EvalSpec
    eval_set: EvalSet
    extractor: Extractor
    features: "torch.Tensor"
    timings: dict[str, float] = field(default_factory=dict)
    pixels: "torch.Tensor | None" = None   # uint8 real images at spec.size, loaded once (the colour gap)

    @property
    def plan(self) -> list[tuple[int, str, int]]:
        return self.eval_set.plan(self.spec)

    def real_pixels(self) -> "torch.Tensor":
        if self.pixels is None:
            self.pixels = images_to_uint8(load_images([it.path for it in self.eval_set.items]), self.spec.size)
        return self.pixels


def prepare_reference(ws: Workspace, store: Any, spec: EvalSpec, *, extractor: Extractor | None = None
                      ) -> RealReference:
    """The eval set of ``spec``, its extractor (``extractor`` if given) and the real features (cached)."""
    eval_set = build_eval_set(ws, store, spec)
    t0 = time.perf_counter()
    extractor = extractor or make_extractor(ws, store, spec)
    t_ex = time.perf_counter() - t0
    t0 = time.perf_counter()
    real = real_features(ws, eval_set, extractor, spec.size)
    return RealReference(spec, eval_set, extractor, real, {"extractor_setup_s": round(t_ex, 3),
                                                           "real_features_s": round(time.perf_counter() - t0, 3)})


def evaluate_checkpoint(ws: Workspace, ref: RealReference, checkpoint: str, *, images_for: ImageSource,
                        checkpoint_sha256: str, backbone: str, memorisation: bool = True, precision: str = "fp32",
                        log: Callable[[str], None] | None = None) -> EvalResult:
    """One checkpoint against a prepared reference: its twins from ``images_for`` (one per entry of
    ``ref.plan``), their features, the scores and the profile; the result is saved and returned."""
    spec = ref.spec
    plan = ref.plan
    t0 = time.perf_counter()
    paths = images_for(checkpoint, [p for _, p, _ in plan], [s for _, _, s in plan])
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    fake_u8 = images_to_uint8(load_images(paths), spec.size)
    fake = ref.extractor.features(fake_u8)
    t_fake = time.perf_counter() - t0
    profile = make_profile(spec, ref.eval_set, ref.extractor, checkpoint=checkpoint,
                           checkpoint_sha256=checkpoint_sha256, backbone=backbone, precision=precision)
    labels = [it.label for it in ref.eval_set.items]
    mets = score(ref.features, fake, labels, spec, fake_labels=[labels[i] for i, _, _ in plan])
    mem = nearest_training_images(fake, ref.features) if memorisation else None
    rid = (f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-"
           f"{sha256_bytes((checkpoint + profile['created_at'] + str(time.perf_counter())).encode())[:8]}")
    res = EvalResult(id=rid, profile=profile, metrics=mets, images=[str(p) for p in paths], memorisation=mem,
                     timings={**ref.timings, "generation_s": round(t_gen, 3), "generated_features_s": round(t_fake, 3)})
    save_result(ws, res)
    save_per_image(ws, res.id, ref, fake, fake_u8)
    if log is not None:
        o = mets["overall"]
        log(f"{checkpoint}: FD {o.get('fd', float('nan')):.4g}  KID {o.get('kid', float('nan')):.4g}")
    return res


def evaluate(ws: Workspace, store: Any, spec: EvalSpec, checkpoints: Sequence[str], *,
             images_for: ImageSource, checkpoint_sha256: Callable[[str], str], backbone: str,
             extractor: Extractor | None = None, memorisation: bool = True,
             log: Callable[[str], None] | None = None, precision: str = "fp32") -> list[EvalResult]:
    """Evaluate ``checkpoints`` ("base", "RUN", "RUN@STEP") under one profile; results saved and returned.
    ``precision`` is the one ``images_for`` generates in (recorded in the profile)."""
    ref = prepare_reference(ws, store, spec, extractor=extractor)
    if log is not None:
        log(f"eval set: {len(ref.eval_set.items)} real images in {len(ref.eval_set.classes)} classes; extractor "
            f"{ref.extractor.name} ({ref.extractor.dim}-d)")
    results = []
    for ck in checkpoints:
        results.append(evaluate_checkpoint(ws, ref, ck, images_for=images_for, checkpoint_sha256=checkpoint_sha256(ck),
                                           backbone=backbone, memorisation=memorisation, precision=precision, log=log))
        # The one-off costs are counted once, with the first checkpoint.
        ref.timings = {"extractor_setup_s": 0.0, "real_features_s": 0.0}
    return results


def evaluations_dir(ws: Workspace) -> Path:
    return ws.root / "evaluations"


def save_result(ws: Workspace, res: EvalResult) -> Path:
    p = evaluations_dir(ws) / f"{validate_name(res.id, 'evaluation id')}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(res.to_dict(), indent=1, sort_keys=True))
    return p


def per_image_path(ws: Workspace, result_id: str) -> Path:
    """The per-image data of a result (what a paired comparison resamples), beside its JSON."""
    return evaluations_dir(ws) / f"{validate_name(result_id, 'evaluation id')}.per-image.safetensors"


def save_per_image(ws: Workspace, result_id: str, ref: RealReference, fake: "torch.Tensor",
                   fake_u8: "torch.Tensor") -> Path:
    """Keep what :func:`compare_paired` needs (small: D floats and one colour gap per image): the generated
    and real features, the real image of each generated one and each one's colour gap; written atomically."""
    import torch
    from safetensors.torch import save

    from .paired import per_image_colour_gap

    owner = [i for i, _, _ in ref.plan]
    real_px = ref.real_pixels()[torch.as_tensor(owner, dtype=torch.int64)]
    gap = per_image_colour_gap(fake_u8.float() / 127.5 - 1.0, real_px.float() / 127.5 - 1.0)
    tensors = {"generated": fake.detach().to("cpu", torch.float64).contiguous(),
               "real": ref.features.detach().to("cpu", torch.float64).contiguous(),
               "owner": torch.as_tensor(owner, dtype=torch.int64), "color_gap": torch.tensor(gap, dtype=torch.float64)}
    p = per_image_path(ws, result_id)
    atomic_write_bytes(p, save(tensors))
    return p


def load_per_image(ws: Workspace, result_id: str) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    p = per_image_path(ws, result_id)
    if not p.is_file():
        raise ConfigError(f"Result {result_id} keeps no per-image features (it predates paired comparisons); "
                          "re-run its evaluation (the images are reused) to compare it paired.")
    try:
        return load_file(str(p))
    except Exception:  # noqa: BLE001 - a damaged file is reported, never trusted
        raise ConfigError(f"The per-image features of result {result_id} are unreadable ({p.name}); re-run its "
                          "evaluation.") from None


def _result(ws: Workspace, res: "EvalResult | str") -> "EvalResult":
    if isinstance(res, EvalResult):
        return res
    found = [r for r in load_results(ws) if r.id == str(res)]
    if not found:
        raise NotFoundError(f"No saved evaluation result {res!r} under {evaluations_dir(ws)}.")
    return found[0]


def compare_paired(ws: Workspace, result_a: "EvalResult | str", result_b: "EvalResult | str", *,
                   n_boot: int = 200, seed: int | None = None) -> dict[str, Any]:
    """Paired comparison of two saved results of one profile (so image j of A and of B share a prompt, a seed
    and a real twin): FD and KID differences A − B by a paired bootstrap, the per-image colour gap by a
    paired t interval, each with its verdict (``paired.verdict``). ``seed`` defaults to the profile's."""
    import torch

    from . import paired as P

    a, b = _result(ws, result_a), _result(ws, result_b)
    diff = profile_mismatch(a.profile, b.profile)
    if diff:
        raise ConfigError(f"{b.profile.get('checkpoint')} was measured differently from {a.profile.get('checkpoint')} "
                          f"({'; '.join(diff[:3])}{'; …' if len(diff) > 3 else ''}): a paired comparison needs one "
                          "profile (the same eval set and seeds); re-evaluate both with one profile.")
    da, db = load_per_image(ws, a.id), load_per_image(ws, b.id)
    if not (torch.equal(da["owner"], db["owner"]) and torch.equal(da["real"], db["real"])):
        raise ConfigError(f"{a.id} and {b.id} were not scored against the same real images in the same order; "
                          "re-evaluate both with one profile.")
    boot_seed = int(spec_from_profile(a.profile).seed if seed is None else seed)
    out = P.paired_bootstrap(da["real"], da["generated"], db["generated"], da["owner"].tolist(), n_boot=n_boot,
                             seed=boot_seed)
    out["color_gap"] = P.paired_mean_test(da["color_gap"].tolist(), db["color_gap"].tolist())
    out.update(a=str(a.profile.get("checkpoint")), b=str(b.profile.get("checkpoint")), result_a=a.id,
               result_b=b.id)
    return out


def load_results(ws: Workspace) -> list[EvalResult]:
    out = []
    d = evaluations_dir(ws)
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out.append(EvalResult(**json.loads(p.read_text(encoding="utf-8"))))
        except (json.JSONDecodeError, TypeError):
            continue
    return out


# =========================================================================================================
# Comparison table
# =========================================================================================================
LOWER_IS_BETTER = {"fd": True, "kid": True, "precision": False, "recall": False, "density": False,
                   "coverage": False}


def comparison_table(results: Sequence[EvalResult], reference: EvalResult | None = None) -> dict[str, Any]:
    """Rows per result (newest per checkpoint); a result whose profile differs from the reference (the first
    by default) is kept but greyed out with the reason and never ranked. The best per column is marked only
    when it is outside every other comparable row's interval (FD: bootstrap CI; KID: ± std)."""
    if not results:
        return {"rows": [], "best": {}, "reference": None}
    ref = reference or results[0]
    rows = []
    for r in results:
        diff = profile_mismatch(ref.profile, r.profile)
        o = r.metrics["overall"]
        rows.append({"id": r.id, "checkpoint": r.profile["checkpoint"], "comparable": not diff,
                     "reason": "; ".join(diff[:3]), **{k: o.get(k) for k in ("fd", "kid", "kid_std", "precision",
                                                                          "recall", "density", "coverage")},
                     "fd_ci": o.get("fd_ci"), "n": o.get("n"), "kid_subset_size": o.get("kid_subset_size"),
                     "random_weights": r.profile.get("random_weights")})
    best: dict[str, str] = {}
    comp = [row for row in rows if row["comparable"]]
    for col, lower in LOWER_IS_BETTER.items():
        cand = [row for row in comp if isinstance(row.get(col), (int, float)) and math.isfinite(row[col])]
        if len(cand) < 2:
            continue
        top = min(cand, key=lambda r: r[col]) if lower else max(cand, key=lambda r: r[col])

        def interval(row: dict[str, Any]) -> tuple[float, float]:
            if col == "fd" and row.get("fd_ci"):
                return tuple(row["fd_ci"])  # type: ignore[return-value]
            if col == "kid":
                if (row.get("kid_subset_size") or 0) >= (row.get("n") or 0):
                    # One subset of all N images (N <= 1000): the std over subsets is 0 and says nothing.
                    return -math.inf, math.inf
                return row["kid"] - (row.get("kid_std") or 0.0), row["kid"] + (row.get("kid_std") or 0.0)
            return row[col], row[col]
        lo, hi = interval(top)
        separated = all((interval(r)[0] > hi) if lower else (interval(r)[1] < lo) for r in cand if r is not top)
        if separated:
            best[col] = top["id"]
    return {"rows": rows, "best": best, "reference": ref.id}


# =========================================================================================================
# Evaluation images from checkpoints (generated once per checkpoint, prompt, seed and sampler settings)
# =========================================================================================================
def checkpoint_sha256(ws: Workspace, ref: str) -> str:
    """sha256 of a checkpoint's adapters file ("base" for the base model)."""
    from .generate import resolve_checkpoint

    ck = resolve_checkpoint(ws, ref)
    return "base" if ck is None else ck.sha256


def generator_source(ws: Workspace, generator: Any, spec: EvalSpec, *, batch_size: int = 8,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> ImageSource:
    """An ImageSource over a ``generate.Generator``: PNG + JSON sidecar per (checkpoint, prompt, seed) under
    ``W/samples/eval/<settings key>/``; images already there (same adapters sha256, backbone, sampler
    settings) are reused, so a second evaluation of the same checkpoint generates nothing."""
    from .pixart import to_pil

    def images_for(ref: str, prompts: list[str], seeds: list[int]) -> list[Path]:
        sha = checkpoint_sha256(ws, ref)
        settings = {"checkpoint_sha256": sha, "backbone": str(generator.spec), "steps": spec.steps,
                    "guidance": spec.guidance, "negative": spec.negative_prompt, "strength": spec.adapter_strength,
                    "sampler": "DPM-Solver++(2M)", "format": EVAL_FORMAT}
        if generator.precision != "fp32":  # bf16 images are other images; fp32 keeps the folders it always had
            settings["precision"] = generator.precision
        key = sha256_bytes(json.dumps(settings, sort_keys=True).encode())[:20]
        folder = ws.samples_dir / "eval" / key
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{sha256_bytes(p.encode())[:16]}-{s}.png" for p, s in zip(prompts, seeds)]
        todo = [i for i, p in enumerate(paths) if not (p.is_file() and p.with_suffix(".json").is_file())]
        if todo:
            generator.use(ref, spec.adapter_strength)
        done = 0
        for j in range(0, len(todo), batch_size):
            if should_stop is not None and should_stop():
                raise InterruptedError("evaluation stopped")
            chunk = todo[j:j + batch_size]
            imgs = generator.sample([prompts[i] for i in chunk], [seeds[i] for i in chunk],
                                    negative=spec.negative_prompt, steps=spec.steps, guidance=spec.guidance)
            for i, im in zip(chunk, to_pil(imgs)):
                atomic_write(paths[i], lambda f, im=im: im.save(f, format="PNG"), binary=True)
                atomic_write_text(paths[i].with_suffix(".json"), json.dumps(
                    {**settings, "checkpoint": ref, "prompt": prompts[i], "seed": seeds[i],
                     "is_random": bool(generator.is_random), "packages": package_versions()}, indent=1))
            done += len(chunk)
            if progress is not None:
                progress(done, len(todo))
        return paths

    return images_for


def run_evaluation(ws: Workspace, store: Any, spec: EvalSpec, checkpoints: Sequence[str], *,
                   backbone: str | None = None, log: Callable[[str], None] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> list[EvalResult]:
    """``evaluate`` with evaluation images from the shared generator of ``backbone`` (default: the first
    named run's training backbone, else $MEDART_BACKBONE, else tiny)."""
    from .generate import default_backbone, get_generator

    if not checkpoints:
        raise ConfigError("Name at least one checkpoint to evaluate (base, RUN or RUN@STEP).")
    spec_bb = backbone or default_backbone(ws, next((c for c in checkpoints if c != "base"), "base"))
    gen = get_generator(ws, spec_bb, spec.precision)
    source = generator_source(ws, gen, spec, progress=progress, should_stop=should_stop)
    return evaluate(ws, store, spec, checkpoints, images_for=source,
                    checkpoint_sha256=lambda ck: checkpoint_sha256(ws, ck), backbone=spec_bb, log=log,
                    precision=gen.precision)


# =========================================================================================================
# Text tables (the CLI prints what the Compare tab shows) and the CLI
# =========================================================================================================
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def format_comparison(table: dict[str, Any]) -> str:
    """Checkpoints × metrics with intervals; '*' marks a best value outside the others' intervals; rows of
    another profile are listed apart with the reason, unranked."""
    head = f"{'checkpoint':<28} {'FD':>10} {'FD 95% CI':>21} {'KID':>10} {'±':>8} {'prec':>6} {'rec':>6} {'dens':>6} {'cov':>6}"
    lines = [head, "-" * len(head)]
    best = table.get("best", {})
    other = []
    for r in table["rows"]:
        if not r["comparable"]:
            other.append(r)
            continue
        mark = {k: "*" if best.get(k) == r["id"] else " " for k in LOWER_IS_BETTER}
        ci = f"[{_fmt(r['fd_ci'][0])}, {_fmt(r['fd_ci'][1])}]" if r.get("fd_ci") else "—"
        name = r["checkpoint"] + (" (random weights)" if r.get("random_weights") else "")
        lines.append(f"{name:<28} {_fmt(r['fd']):>9}{mark['fd']} {ci:>21} {_fmt(r['kid']):>9}{mark['kid']} "
                     f"{_fmt(r['kid_std'], 2):>8} {_fmt(r['precision'], 3):>6} {_fmt(r['recall'], 3):>6} "
                     f"{_fmt(r['density'], 3):>6} {_fmt(r['coverage'], 3):>6}")
    for r in other:
        lines.append(f"{r['checkpoint']:<28} not comparable: {r['reason']}")
    return "\n".join(lines)


def format_blind_results(res: dict[str, Any]) -> str:
    lines = [f"study {res['study']} ({res['kind']}): {res['pairs']} pairs, {res['votes']} votes by "
             f"{len(res['reviewers'])} reviewer(s)", f"{'source':<28} {'wins':>5} {'win rate':>9} {'95% CI':>16}"]
    for r in res["rows"]:
        lines.append(f"{r['source']:<28} {r['wins']:>5} {_fmt(r['win_rate'], 3):>9} "
                     f"{'[' + _fmt(r['ci'][0], 3) + ', ' + _fmt(r['ci'][1], 3) + ']':>16}")
    if "synthetic_taken_for_real" in res:
        f = res["synthetic_taken_for_real"]
        lines.append(f"synthetic taken for real: {f['count']} of {res['preferences']} ({_fmt(f['rate'], 3)}, "
                     f"95% CI [{_fmt(f['ci'][0], 3)}, {_fmt(f['ci'][1], 3)}])")
    return "\n".join(lines)


# ---- as a job -----------------------------------------------------------------------------------------------
def run_evaluate_job(ctx: Any) -> dict[str, Any]:
    """The ``evaluate`` job kind: config {"spec": EvalSpec fields, "checkpoints": [...], "backbone": ...}. On a
    Slurm executor the job runs :func:`medart_core.fanout.run_evaluate_job_array` instead."""
    from .captions import CaptionStore

    spec = EvalSpec(**ctx.config.get("spec", {}))
    store = CaptionStore.for_workspace(ctx.ws)
    results = run_evaluation(ctx.ws, store, spec, list(ctx.config["checkpoints"]),
                             backbone=ctx.config.get("backbone"), log=ctx.log,
                             progress=lambda d, t: ctx.progress(step=d, total=t), should_stop=ctx.should_stop)
    return {"results": [r.id for r in results]}


def prepare_evaluate_job(ws: Workspace, config: dict[str, Any]) -> tuple[dict[str, Any], None]:
    """Validate an ``evaluate`` job's config at submit time: {"spec": {...}, "checkpoints": [...], "backbone"}."""
    unknown = sorted(set(config) - {"spec", "checkpoints", "backbone"})
    if unknown:
        raise ConfigError(f"Unknown evaluate job keys {unknown}; use 'spec', 'checkpoints' and 'backbone'.")
    try:
        spec = EvalSpec(**dict(config.get("spec") or {}))
    except TypeError as e:
        raise ConfigError(f"Invalid evaluation spec: {e}") from None
    refs = [str(c) for c in config.get("checkpoints") or []]
    if not refs:
        raise ConfigError("Name at least one checkpoint to evaluate (base, RUN or RUN@STEP).")
    from .generate import resolve_checkpoint

    for r in refs:
        resolve_checkpoint(ws, r)
    return {"spec": dataclasses.asdict(spec), "checkpoints": refs, "backbone": config.get("backbone")}, None


# =========================================================================================================
# Saved results, as the Compare tab and the CLI use them: what to compare, the eval set behind a result,
# side-by-side grids and blind-review studies made from results
# =========================================================================================================
# Profile fields that decide the pixels of an evaluation image (besides the checkpoint): results that agree on
# them hold the same (prompt, seed) images per row, whatever extractor measured them.
IMAGE_PROFILE_KEYS = ("dataset", "eval_set_sha256", "sampler", "steps", "guidance", "negative_prompt",
                      "adapter_strength", "backbone", "precision")


def checkpoint_order(ref: str) -> tuple[int, str, int]:
    """Sort key for checkpoint refs: base first, then runs by name and step, anything else last."""
    if ref == "base":
        return (0, "", 0)
    run, sep, step = ref.partition("@")
    step = step.partition(":")[0]   # "RUN@STEP:ema" sorts beside RUN@STEP
    if sep and step.isdigit():
        return (1, run, int(step))
    return (2, ref, 0)


def _newest(results: Sequence[EvalResult]) -> EvalResult:
    return max(results, key=lambda r: (str(r.profile.get("created_at", "")), r.id))


def select_for_comparison(results: Sequence[EvalResult], *, checkpoints: Sequence[str] | None = None,
                          dataset: str | None = None) -> tuple[list[EvalResult], EvalResult | None]:
    """One saved result per checkpoint for the comparison table, and the reference: the newest result, whose
    profile the others must match. For each checkpoint its newest result comparable with the reference, else
    its newest (shown greyed out). Ordered base, then runs by name and step: never by a metric."""
    pool = [r for r in results if (dataset is None or r.profile.get("dataset") == dataset)
            and (not checkpoints or r.profile.get("checkpoint") in checkpoints)]
    if not pool:
        return [], None
    ref = _newest(pool)
    by_ck: dict[str, list[EvalResult]] = {}
    for r in pool:
        by_ck.setdefault(str(r.profile.get("checkpoint")), []).append(r)
    chosen = []
    for rs in by_ck.values():
        comparable = [r for r in rs if not profile_mismatch(ref.profile, r.profile)]
        chosen.append(_newest(comparable or rs))
    chosen.sort(key=lambda r: (checkpoint_order(str(r.profile.get("checkpoint"))), r.id))
    return chosen, ref


def spec_from_profile(profile: dict[str, Any]) -> EvalSpec:
    """The EvalSpec a result was measured with, as far as its profile records it: everything that builds the
    eval set and the images, and the KID, PRDC and bootstrap settings (min_samples, which only words warnings,
    keeps its default)."""
    import re

    m = re.fullmatch(r"per class up to (\d+) \(seed (-?\d+)\)", str(profile.get("real_split", "")))
    if not m:
        raise ConfigError(f"This result's profile has no readable real split ({profile.get('real_split')!r}); "
                          "re-run the evaluation.")
    return EvalSpec(dataset=profile["dataset"], classes=list(profile.get("classes") or []) or None,
                    per_class=int(m[1]), seed=int(m[2]), captions=profile.get("captions", "approved"),
                    extractor=profile.get("extractor", "domain"), size=int(profile.get("size", 64)),
                    steps=int(profile.get("steps", 20)), guidance=float(profile.get("guidance", 4.5)),
                    negative_prompt=profile.get("negative_prompt", ""),
                    adapter_strength=float(profile.get("adapter_strength", 1.0)),
                    precision=str(profile.get("precision", "fp32")),
                    caption_text=str(profile.get("caption_text", "caption")),
                    per_image=int(profile.get("per_image", 1)),
                    extractor_dataset=profile.get("extractor_dataset"),
                    extractor_epochs=int(profile.get("extractor_epochs", 30)),
                    kid_subsets=int((profile.get("kid") or {}).get("subsets", 100)),
                    n_boot=int(profile.get("bootstrap", 50)), prdc_k=int(profile.get("prdc_k", 5)))


def result_eval_items(ws: Workspace, store: Any, res: EvalResult) -> list[EvalItem]:
    """The evaluation set behind a saved result, aligned with ``res.images``: for each generated image its real
    twin (path, class, pixel hash), prompt and seed. Rebuilt from the profile while the dataset and captions
    are unchanged (the eval-set digest matches); otherwise from the images' sidecars (prompt, seed), the real
    twin found by its seed (``derive_seed(seed, 'eval-seed', pixel hash)``)."""
    from .errors import MedArtError

    spec = spec_from_profile(res.profile)
    try:
        es = build_eval_set(ws, store, spec)
        plan = es.plan(spec)
        if es.digest() == res.profile.get("eval_set_sha256") and len(plan) == len(res.images):
            return [dataclasses.replace(es.items[i], seed=seed) for i, _, seed in plan]
    except MedArtError:
        pass
    by_seed = {derive_seed(spec.seed, "eval-seed", r.pixel_hash, *([k] if k else []), bits=31): r
               for r in store.list_images(spec.dataset) for k in range(int(spec.per_image))}
    items = []
    for p in res.images:
        side = Path(p).with_suffix(".json")
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise NotFoundError(f"The sidecar {side} of an evaluation image is missing and the eval set has changed "
                                "since; re-run the evaluation.") from None
        rec = by_seed.get(int(meta["seed"]))
        if rec is None:
            raise NotFoundError(f"The real image behind {Path(p).name} is no longer in dataset {spec.dataset!r}; "
                                "re-run the evaluation.")
        items.append(EvalItem(key=f"img-{rec.id}", label=rec.label, path=ws.image_path(spec.dataset, rec.file_name),
                              pixel_hash=rec.pixel_hash, prompt=str(meta["prompt"]), seed=int(meta["seed"])))
    return items


def is_random_backbone(profile: dict[str, Any]) -> bool:
    """Images of this result come from a backbone with seeded random weights (``tiny``/``small``)."""
    from .backbone import PRESETS

    return str(profile.get("backbone")) in PRESETS


@dataclass
class SideBySide:
    """Checkpoints (columns) × (prompt, seed) rows, each row with the real image its prompt came from."""

    columns: list[EvalResult]
    items: list[EvalItem]
    excluded: list[tuple[str, str]]       # (checkpoint, why it is not a column)

    @property
    def checkpoints(self) -> list[str]:
        return [str(r.profile["checkpoint"]) for r in self.columns]

    def image(self, row: int, col: int) -> str:
        return self.columns[col].images[row]


def side_by_side(ws: Workspace, store: Any, results: Sequence[EvalResult],
                 reference: EvalResult | None = None) -> SideBySide:
    """The grid of ``results`` (one column per checkpoint, in the given order): only results whose images were
    made like the reference's (IMAGE_PROFILE_KEYS: the same eval set, sampler and settings) join, and each
    column is checked to hold the same (prompt, seed) in every row (an image's file name encodes both)."""
    if not results:
        return SideBySide([], [], [])
    ref = reference or results[0]
    names = [Path(p).name for p in ref.images]
    cols, excluded, seen = [], [], set()
    for r in results:
        ck = str(r.profile.get("checkpoint"))
        diff = [k for k in IMAGE_PROFILE_KEYS if r.profile.get(k) != ref.profile.get(k)]
        if ck in seen:
            continue
        if diff:
            excluded.append((ck, "images made differently: " + ", ".join(diff)))
        elif [Path(p).name for p in r.images] != names:
            excluded.append((ck, "different (prompt, seed) per row"))
        else:
            cols.append(r)
            seen.add(ck)
    return SideBySide(cols, result_eval_items(ws, store, ref), excluded)


def export_grid_png(ws: Workspace, grid: SideBySide, rows: Sequence[int] | None = None, *, cell: int = 160,
                    path: str | Path | None = None) -> Path:
    """The side-by-side grid as one PNG (default under ``W/exports/compare-grids/``): a header naming the
    columns (real, then the checkpoints), one row per (prompt, seed) labelled with its class and seed, and
    the random-weight label when the images come from a random-weight backbone."""
    from PIL import Image, ImageDraw, ImageFont

    from .constants import RANDOM_LABEL
    from .extractors import prepare_image

    rows = list(range(len(grid.items))) if rows is None else list(rows)
    if not grid.columns or not rows:
        raise ConfigError("Nothing to export: load results with at least one checkpoint and one row first.")
    font = ImageFont.load_default(size=max(10, cell // 11))
    label_w, head_h, pad = cell, max(28, cell // 5), 4
    random = any(is_random_backbone(c.profile) for c in grid.columns)
    top = head_h * (2 if random else 1)
    ncol = 1 + len(grid.columns)
    W, H = label_w + ncol * (cell + pad), top + len(rows) * (cell + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if random:
        draw.text((pad, pad), f"{RANDOM_LABEL}: generated images are noise, numbers a smoke test", fill=(180, 83, 9),
                  font=font)
    for j, name in enumerate(["real"] + grid.checkpoints):
        draw.text((label_w + j * (cell + pad) + pad, top - head_h + pad), name, fill=(0, 0, 0), font=font)
    for i, r in enumerate(rows):
        it = grid.items[r]
        y = top + i * (cell + pad)
        draw.text((pad, y + pad), f"{it.label}\nseed {it.seed}", fill=(0, 0, 0), font=font)
        paths = [str(it.path)] + [grid.image(r, c) for c in range(len(grid.columns))]
        for j, p in enumerate(paths):
            with Image.open(p) as im:
                canvas.paste(prepare_image(im, cell), (label_w + j * (cell + pad), y))
    if path is None:
        folder = ws.exports_dir / "compare-grids"
        folder.mkdir(parents=True, exist_ok=True)
        digest = sha256_bytes(repr([c.id for c in grid.columns] + rows).encode())[:6]
        path = folder / f"grid-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{digest}.png"
    path = Path(path)
    atomic_write(path, lambda f: canvas.save(f, format="PNG"), binary=True)
    return path


def create_blind_study(ws: Workspace, store: Any, reviews: Any, name: str, kind: str, a: EvalResult,
                       b: EvalResult | None = None, *, seed: int = 0, created_by: str | None = None) -> int:
    """A blind-review study from saved results. ``checkpoints``: image i of ``a`` against image i of ``b`` (the
    same prompt and seed; both made like each other, see :func:`side_by_side`). ``real-vs-synthetic``: the real
    image behind each generated image of ``a`` against it (source A is ``real``). The study name is shown to
    reviewers, so it may not name a source."""
    import re

    items = result_eval_items(ws, store, a)
    ck_a = str(a.profile["checkpoint"])
    if kind == "checkpoints":
        if b is None:
            raise ConfigError("A checkpoint study needs two results (A and B).")
        ck_b = str(b.profile["checkpoint"])
        if ck_a == ck_b:
            raise ConfigError(f"Both results are of {ck_a}: pick two different checkpoints.")
        grid = side_by_side(ws, store, [a, b])
        if len(grid.columns) != 2:
            raise ConfigError(f"{ck_b} cannot be paired with {ck_a}: {grid.excluded[0][1]}; evaluate both with one "
                              "profile.")
        sources, images = (ck_a, ck_b), (a.images, b.images)
    elif kind == "real-vs-synthetic":
        sources, images = ("real", ck_a), ([str(it.path) for it in items], a.images)
    else:
        raise ConfigError(f"study kind must be 'checkpoints' or 'real-vs-synthetic', got {kind!r}.")
    words = {s for s in sources if s != "real"} | {s.partition("@")[0] for s in sources if "@" in s}
    for w in words:
        if re.search(rf"(?<![\w@]){re.escape(w)}(?![\w@])", name or "", flags=re.IGNORECASE):
            raise ConfigError(f"The study name is shown to reviewers and must not name a source ({w!r}); choose a "
                              "neutral name such as 'study-3'.")
    return reviews.create_study(name, kind, sources[0], sources[1], images[0], images[1],
                                prompts=[it.prompt for it in items], seed=seed, created_by=created_by,
                                meta={"results": [a.id] + ([b.id] if b is not None and kind == "checkpoints" else [])})

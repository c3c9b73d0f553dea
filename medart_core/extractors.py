"""Feature extractors for evaluation, and the one image preparation both real and generated images go
through.

* ``inception``: the FID Inception-v3 (``pt_inception-2015-12-05``, the weights torch-fidelity and
  torchmetrics use) through torchmetrics' ``NoTrainInceptionV3`` with ``antialias=False`` (torch-fidelity's
  TF1-compatible bilinear resize to 299, as published FIDs are computed); 2048-d pool features.
* ``dinov2``: transformers ``Dinov2Model`` (Hub id or folder), the CLS token after the final layer norm
  (FD_DINOv2, Stein et al. 2023), ImageNet normalisation at the model's image size.
* ``domain``: the penultimate layer of a small classifier trained on the user's labelled real training
  images (a domain Fréchet distance, like the paper's KFD/HFD columns); see ``evaluate.domain_extractor``.
* ``custom``: any ``nn.Module`` mapping uint8 [N, 3, S, S] images to [N, D] features.

Each extractor has a ``name``, the sha256 of its weights, its feature ``layer`` and ``dim``, and counts
its ``calls`` (so tests can prove a cache skipped it). Weights are never unpickled: a ``.pth`` file is read
with ``torch.load(weights_only=True)``, and anything that is not a plain tensor dict is refused.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ConfigError, MissingWeightsError, UnsafeFileError
from .fileio import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "MEDART_INCEPTION_WEIGHTS"
PREPARATION = "RGB (grayscale replicated to 3 channels), shorter side to S with PIL bicubic, centre S×S crop, uint8"


def prepare_image(img: Any, size: int) -> Any:
    """The one resize used for real and generated images alike (see PREPARATION): a PIL RGB S×S image."""
    from PIL import Image

    rgb = img.convert("RGB")
    w, h = rgb.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return rgb.crop((left, top, left + size, top + size))


def images_to_uint8(images: Sequence[Any], size: int) -> "torch.Tensor":
    """PIL images (any mode, any size) as a uint8 [N, 3, S, S] tensor through :func:`prepare_image`."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(prepare_image(im, size), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class Extractor:
    """Base: ``features(uint8 [N,3,S,S]) -> float64 [N, D]`` in batches, counting calls."""

    name: str = "custom"
    layer: str = ""
    dim: int = 0
    weights_sha256: str = ""
    is_random: bool = False      # random weights: numbers are labelled as a smoke test

    def __init__(self) -> None:
        self.calls = 0
        self.images_seen = 0

    def _forward(self, x: "torch.Tensor") -> "torch.Tensor":  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, images: "torch.Tensor", *, batch_size: int = 32) -> "torch.Tensor":
        import torch

        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ConfigError(f"extractor input must be uint8 [N, 3, S, S], got {images.dtype} {tuple(images.shape)}.")
        self.calls += 1
        self.images_seen += int(images.shape[0])
        out = []
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                out.append(self._forward(images[i:i + batch_size]).reshape(min(batch_size, images.shape[0] - i), -1))
        return torch.cat(out).to(torch.float64) if out else torch.zeros(0, self.dim, dtype=torch.float64)

    def describe(self) -> dict[str, Any]:
        return {"extractor": self.name, "weights_sha256": self.weights_sha256, "feature_layer": self.layer,
                "feature_dim": self.dim, "random_weights": self.is_random}


# ---- Inception (FID) ------------------------------------------------------------------------------------
def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``path``, else $MEDART_INCEPTION_WEIGHTS, else the torch hub cache."""
    if path:
        p = Path(path).expanduser()
    elif os.environ.get(INCEPTION_ENV):
        p = Path(os.environ[INCEPTION_ENV]).expanduser()
    else:
        import torch.hub

        p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not p.is_file():
        raise MissingWeightsError(
            f"The FID Inception weights are not at {p}. Fetch the file {INCEPTION_FILE} (torch-fidelity's "
            f"release v0.2.0, the weights torchmetrics and torch-fidelity use) on a machine with network access "
            f"and either put it at {p} or set {INCEPTION_ENV} to its path; or evaluate with --extractor domain "
            "or dinov2.")
    return p


def load_plain_state_dict(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """A state dict of tensors from a .pth/.safetensors file without running pickled code."""
    import torch

    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of the restricted unpickler means "not plain tensors"
        raise UnsafeFileError(f"{p} is not a plain tensor state dict ({type(e).__name__}); refusing to unpickle it. "
                              "Use the original weights file, or convert it to safetensors.") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UnsafeFileError(f"{p} does not hold a flat dict of tensors; refusing to use it as weights.")
    return sd


class InceptionExtractor(Extractor):
    name = "inception"
    layer = "pool3 (2048)"
    dim = 2048

    def __init__(self, weights: str | os.PathLike | None = None, *, is_random: bool = False):
        import tempfile

        import torch
        from torchmetrics.image.fid import NoTrainInceptionV3

        super().__init__()
        path = inception_weights_path(weights)
        self.weights_sha256 = sha256_file(path)
        self.is_random = is_random
        sd = load_plain_state_dict(path)
        # torch-fidelity's constructor unpickles its file with weights_only=False: hand it a file we wrote
        # ourselves from the tensors loaded safely above.
        with tempfile.TemporaryDirectory() as d:
            safe = Path(d) / "inception.pth"
            torch.save(sd, safe)
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(safe), antialias=False)

    def _forward(self, x: "torch.Tensor") -> "torch.Tensor":
        return self.net(x)


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """The exact FID Inception-v3 architecture with seeded random weights, saved as a plain state dict.

    For offline tests and demos only: features from it are labelled random and mean nothing about image
    quality, but the whole torchmetrics code path runs as it does with the real file."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *a: Any, **k: Any) -> Any:  # keep the seeded initialisation
            return None

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    empty = out.with_name(out.name + ".empty")
    torch.save({}, empty)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        # He initialisation keeps activations from vanishing through 90+ layers, so random features still
        # vary with the image (the default init leaves every image with nearly the same features).
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    finally:
        torch.random.set_rng_state(state)
        empty.unlink(missing_ok=True)
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, out)
    return out


# ---- DINOv2 ----------------------------------------------------------------------------------------------
class Dinov2Extractor(Extractor):
    name = "dinov2"

    def __init__(self, spec: str | None = None, *, model: Any = None, is_random: bool = False):
        super().__init__()
        if model is None:
            model = _load_dinov2(spec or "facebook/dinov2-large")
        self.model = model.eval()
        self.is_random = is_random
        self.dim = int(model.config.hidden_size)
        self.size = int(model.config.image_size)
        self.layer = f"CLS token after layernorm ({self.dim})"
        self.weights_sha256 = _module_sha(model)

    def _forward(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        x = x.float() / 255.0
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return self.model(pixel_values=(x - mean) / std).pooler_output


def _load_dinov2(spec: str) -> Any:
    from transformers import Dinov2Model

    from .hub import is_offline

    try:
        return Dinov2Model.from_pretrained(spec, local_files_only=is_offline() or not Path(spec).is_dir() and
                                           not _hub_ok())
    except OSError as e:
        raise MissingWeightsError(f"Could not load DINOv2 weights {spec!r} ({type(e).__name__}): download them "
                                  f"(`huggingface-cli download {spec}`) and copy the Hugging Face cache here, or "
                                  "pass a local folder; or evaluate with --extractor domain.") from None


def _hub_ok() -> bool:
    from .hub import hub_reachable

    return hub_reachable()


def _module_sha(module: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- any module ----------------------------------------------------------------------------------------------
class ModuleExtractor(Extractor):
    """Features from any ``nn.Module`` taking uint8 [N, 3, S, S] (``custom``) or float inputs in [0, 1]."""

    def __init__(self, module: Any, *, name: str = "custom", layer: str = "output", dim: int | None = None,
                 uint8_input: bool = False, is_random: bool = False):
        super().__init__()
        self.module = module.eval()
        self.name, self.layer, self.uint8_input, self.is_random = name, layer, uint8_input, is_random
        self.weights_sha256 = _module_sha(module)
        self.dim = int(dim or 0)

    def _forward(self, x: "torch.Tensor") -> "torch.Tensor":
        out = self.module(x if self.uint8_input else x.float() / 255.0)
        self.dim = int(out.shape[-1])
        return out

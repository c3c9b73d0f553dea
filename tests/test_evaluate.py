"""Evaluation: the real torchmetrics Inception path (random weights, labelled), DINOv2 from a tiny config, the
domain classifier on the sample dataset, the real-feature cache, and refusing mismatched profiles.

The "generated" images here are the real images with a known colour shift (or none), written as PNGs: the
point is to test the measuring, not a model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medart_core import evaluate as E
from medart_core.errors import ConfigError, ProfileMismatchError


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from medart_core.captions import CaptionStore
    from medart_core.data import build_sample_dataset
    from medart_core.workspace import Workspace

    ws = Workspace.open(tmp_path_factory.mktemp("evalws"))
    store = CaptionStore.for_workspace(ws)
    build_sample_dataset(ws, store, "sample")
    return ws, store


def shifted_source(ws, shifts: dict[str, float]):
    """images_for(checkpoint, prompts, seeds): each eval-set real image, colour-shifted by shifts[checkpoint]."""
    def images_for(ck, prompts, seeds):
        out = []
        spec_set = images_for.eval_set
        d = ws.samples_dir / f"fake-{ck}"
        d.mkdir(parents=True, exist_ok=True)
        for it in spec_set.items:
            arr = np.asarray(Image.open(it.path).convert("RGB")).astype(np.float32)
            arr[..., 0] = np.clip(arr[..., 0] + shifts[ck], 0, 255)
            p = d / f"{it.key}.png"
            Image.fromarray(arr.astype(np.uint8)).save(p)
            out.append(p)
        return out
    return images_for


def _run(ws, store, spec, checkpoints, shifts, extractor=None):
    src = shifted_source(ws, shifts)
    src.eval_set = E.build_eval_set(ws, store, spec)
    return E.evaluate(ws, store, spec, checkpoints, images_for=src, checkpoint_sha256=lambda ck: f"sha-{ck}",
                      backbone="tiny", extractor=extractor)


def test_domain_extractor_fd_orders_shifts_and_real_cache_skips_extraction(sample):
    ws, store = sample
    spec = E.EvalSpec(dataset="sample", per_class=6, captions="latest", extractor="domain", n_boot=10,
                      kid_subsets=20, min_samples=10)
    ex = E.make_extractor(ws, store, spec)
    assert ex.name == "domain" and ex.dim == 64 and len(ex.classes) == 10
    r_same, r_far = _run(ws, store, spec, ["same", "far"], {"same": 0.0, "far": 120.0}, extractor=ex)
    assert r_same.metrics["overall"]["fd"] == pytest.approx(0.0, abs=1e-6)   # FID(x, x) ≈ 0
    assert r_far.metrics["overall"]["fd"] > 1e-3
    assert r_far.metrics["overall"]["kid"] > r_same.metrics["overall"]["kid"]
    assert set(r_far.metrics["per_class"]) == set(ex.classes)
    assert r_same.profile["n_real"] == r_same.profile["n_generated"] == len(r_same.images)
    calls = ex.calls
    # A second evaluation against the same real set: real features come from the cache (one extraction only,
    # for the generated images) and give identical numbers.
    (again,) = _run(ws, store, spec, ["far"], {"far": 120.0}, extractor=ex)
    assert ex.calls == calls + 1
    assert again.metrics["overall"]["fd"] == r_far.metrics["overall"]["fd"]
    # The domain classifier is cached too: a new extractor object loads it instead of training again.
    ex2 = E.make_extractor(ws, store, spec)
    assert ex2.weights_sha256 == ex.weights_sha256
    table = E.comparison_table([r_same, r_far])
    assert [r["comparable"] for r in table["rows"]] == [True, True]
    assert table["best"].get("fd") == r_same.id


def test_compare_paired_of_stored_results(sample):
    """Two identical checkpoints are not separated on FD, KID or the colour gap; a colour-shifted one is; a
    result of another profile, or one without per-image features, is refused with a clear error."""
    ws, store = sample
    spec = E.EvalSpec(dataset="sample", per_class=6, captions="latest", extractor="domain", n_boot=10,
                      kid_subsets=20, min_samples=10)
    same, twin, far = _run(ws, store, spec, ["same", "twin", "far"], {"same": 0.0, "twin": 0.0, "far": 60.0})
    assert E.per_image_path(ws, same.id).is_file()
    tie = E.compare_paired(ws, same, twin.id, n_boot=100)
    assert (tie["a"], tie["b"], tie["n_real"]) == ("same", "twin", len(same.images))
    for k in ("fd", "kid", "color_gap"):
        assert tie[k]["ci"][0] <= 0.0 <= tie[k]["ci"][1] and tie[k]["verdict"] == "not separated", (k, tie[k])
    apart = E.compare_paired(ws, far, same, n_boot=100)
    for k in ("fd", "kid", "color_gap"):
        assert apart[k]["diff"] > 0 and apart[k]["verdict"] == "B better than A", (k, apart[k])
    assert E.compare_paired(ws, far, same, n_boot=100) == apart           # seeded: reproducible
    # The Compare → Metrics view: a line per row against the first (checkpoint order: far, same, twin).
    from types import SimpleNamespace

    from studio.compare_metrics import compare_view

    view = compare_view(SimpleNamespace(ws=ws), [same.id, twin.id, far.id])
    assert [r["checkpoint"] for r in view["table"]["rows"]] == ["far", "same", "twin"]
    assert [(p["a"], p["b"]) for p in view["table"]["paired"]] == [("same", "far"), ("twin", "far")]
    assert view["table_html"].count("class='cmp-paired-row'") == 2
    assert "<b>same better than far</b>" in view["table_html"] and "<b>twin better than far</b>" in view["table_html"]
    other_spec = E.EvalSpec(dataset="sample", per_class=5, captions="latest", extractor="domain", n_boot=10,
                            kid_subsets=20, min_samples=10)
    (other,) = _run(ws, store, other_spec, ["same"], {"same": 0.0})
    with pytest.raises(ConfigError, match="one profile"):
        E.compare_paired(ws, same, other)
    E.per_image_path(ws, twin.id).unlink()
    with pytest.raises(ConfigError, match="re-run its evaluation"):
        E.compare_paired(ws, same, twin)


def test_mismatched_profiles_are_refused_and_greyed_out(sample):
    ws, store = sample
    a = E.EvalSpec(dataset="sample", per_class=3, captions="latest", n_boot=0, kid_subsets=5, min_samples=2)
    b = E.EvalSpec(dataset="sample", per_class=3, captions="latest", n_boot=0, kid_subsets=5, min_samples=2,
                   steps=10)
    ex = E.make_extractor(ws, store, a)
    (ra,) = _run(ws, store, a, ["x"], {"x": 10.0}, extractor=ex)
    (rb,) = _run(ws, store, b, ["y"], {"y": 10.0}, extractor=ex)
    with pytest.raises(ProfileMismatchError, match="steps"):
        E.require_comparable([ra.profile, rb.profile])
    table = E.comparison_table([ra, rb])
    assert table["rows"][1]["comparable"] is False and "steps" in table["rows"][1]["reason"]
    assert "fd" not in table["best"]
    assert {r.id for r in E.load_results(ws)} >= {ra.id, rb.id}


def test_inception_through_torchmetrics_with_random_weights(tmp_path):
    """The exact FID Inception architecture with seeded random weights (labelled as such), loaded from a
    temp file through torchmetrics' NoTrainInceptionV3; our FID equals torchmetrics' FID on its features."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from medart_core.extractors import InceptionExtractor, images_to_uint8, write_random_inception_weights

    path = write_random_inception_weights(tmp_path / "random-inception.pth", seed=0)
    ex = InceptionExtractor(path, is_random=True)
    assert ex.describe()["random_weights"] and ex.dim == 2048 and len(ex.weights_sha256) == 64
    g = np.random.default_rng(0)
    imgs = [Image.fromarray(g.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(8)]
    gray = [Image.fromarray(g.integers(0, 255, (40, 48), dtype=np.uint8), mode="L") for _ in range(8)]
    x, y = images_to_uint8(imgs, 64), images_to_uint8(gray, 64)
    assert y.shape == (8, 3, 64, 64) and bool((y[:, 0] == y[:, 1]).all())   # grayscale replicated
    fr, ff = ex.features(x), ex.features(y)
    assert fr.shape == (8, 2048) and ex.calls == 2
    from medart_core.metrics import frechet_distance

    fid = FrechetInceptionDistance(feature=ex.net)
    fid.update(x, real=True)
    fid.update(y, real=False)
    assert frechet_distance(fr, ff) == pytest.approx(float(fid.compute()), rel=1e-3)


def test_unsafe_or_missing_inception_weights_give_clear_errors(tmp_path, monkeypatch):
    import pickle

    from medart_core.errors import MissingWeightsError, UnsafeFileError
    from medart_core.extractors import InceptionExtractor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    monkeypatch.delenv("MEDART_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError, match="MEDART_INCEPTION_WEIGHTS"):
        InceptionExtractor()
    evil = tmp_path / "evil.pth"

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    evil.write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(UnsafeFileError, match="refusing"):
        InceptionExtractor(evil)


def test_dinov2_from_a_tiny_config():
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from medart_core.extractors import Dinov2Extractor

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, image_size=56, patch_size=14))
    ex = Dinov2Extractor(model=model, is_random=True)
    x = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    f = ex.features(x)
    assert f.shape == (3, 32) and ex.dim == 32 and torch.isfinite(f).all()


def test_downstream_utility_and_memorisation(sample):
    import torch

    ws, store = sample
    spec = E.EvalSpec(dataset="sample", per_class=8, captions="latest")
    es = E.build_eval_set(ws, store, spec)
    classes = es.classes
    x = E.images_to_uint8(E.load_images([it.path for it in es.items]), 32)
    y = [classes.index(it.label) for it in es.items]
    idx = torch.arange(len(y))
    train, test = idx[idx % 4 != 0], idx[idx % 4 == 0]
    res = E.downstream_utility(x[train], [y[i] for i in train], x[train].flip(-1), [y[i] for i in train],
                               x[test], [y[i] for i in test], len(classes), epochs=8)
    for k in ("real", "synthetic", "real+synthetic"):
        assert 0 <= res[k]["accuracy"] <= 1 and res[k]["accuracy_ci"][0] <= res[k]["accuracy"] <= res[k]["accuracy_ci"][1]
    assert res["real"]["accuracy"] > 1.5 / len(classes), "real images of 10 classes are learnable beyond chance"
    feats = torch.randn(10, 8, dtype=torch.float64)
    mem = E.nearest_training_images(feats[:3], feats, threshold=0.99)
    assert mem["flagged"] == [0, 1, 2] and mem["nearest"] == [0, 1, 2]


@pytest.mark.slow
def test_run_evaluation_of_base_and_a_checkpoint_reuses_images_and_cli_prints_the_table(sample, capsys):
    """Real generation from the tiny base and a cpu-smoke checkpoint: seed-matched prompts in both, images
    reused on a second evaluation, and the CLI prints the same table."""
    from medart_core.cli import main
    from medart_core.train import TrainConfig, train

    ws, store = sample
    if not (ws.runs_dir / "ev").is_dir():
        train(TrainConfig.from_preset("cpu-smoke", captions="latest", max_steps=2, checkpoint_every=2,
                                      validate_every=100, export_merged=False), ws, store, run_name="ev",
              log=lambda m: None)
    spec = E.EvalSpec(dataset="sample", per_class=2, captions="latest", n_boot=5, kid_subsets=5, min_samples=2,
                      steps=3)
    base, run = E.run_evaluation(ws, store, spec, ["base", "ev@2"])
    assert run.profile["checkpoint_sha256"] != "base" and base.profile["checkpoint_sha256"] == "base"
    assert E.profile_mismatch(base.profile, run.profile) == []
    assert len(base.images) == len(run.images) == len(E.build_eval_set(ws, store, spec).items)
    assert [Path(p).name for p in base.images] == [Path(p).name for p in run.images]  # same (prompt, seed)
    assert base.images != run.images
    side = Path(run.images[0]).with_suffix(".json")
    import json as _json

    meta = _json.loads(side.read_text())
    assert meta["checkpoint"] == "ev@2" and meta["is_random"] is True and meta["seed"] > 0
    mtimes = [Path(p).stat().st_mtime_ns for p in run.images]
    (again,) = E.run_evaluation(ws, store, spec, ["ev@2"])
    assert [Path(p).stat().st_mtime_ns for p in again.images] == mtimes, "images are reused, not regenerated"
    assert again.metrics["overall"]["fd"] == run.metrics["overall"]["fd"]
    capsys.readouterr()
    assert main(["evaluate", "--workspace", str(ws.root), "--dataset", "sample", "--checkpoints", "base,ev@2",
                 "--per-class", "2", "--captions", "latest", "--steps", "3", "--json"]) == 0
    lines = [_json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["checkpoint"] for x in lines] == ["base", "ev@2"]
    assert main(["review-results", "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert "ev@2" in out and "FD" in out


def test_kid_of_one_subset_of_all_images_is_never_marked_best():
    def res(i, fd, kid):
        return E.EvalResult(id=f"r{i}", profile={"checkpoint": f"c{i}"},
                            metrics={"overall": {"fd": fd, "fd_ci": [fd - 1, fd + 1], "kid": kid, "kid_std": 0.0,
                                                 "kid_subset_size": 10, "n": 10}})
    table = E.comparison_table([res(0, 10.0, 0.1), res(1, 50.0, 0.5)])
    assert table["best"] == {"fd": "r0"}, "FD intervals are separated; KID over one subset of all N has none"


def test_twins_per_image_class_prompts_and_the_profile_round_trip(sample):
    """``per_image`` twins per real image (the image's own seed first), class-seed prompts, the domain
    classifier of another dataset: all recorded in the profile (only away from their defaults) and read back
    by ``spec_from_profile``; per-class scores pair each class's real images with its twins."""
    from medart_core.examples import class_seed_caption

    ws, store = sample
    spec = E.EvalSpec(dataset="sample", classes=["fundus_retina", "histology_ihc"], per_class=5, captions="latest",
                      caption_text="class", per_image=2, extractor_epochs=2, kid_subsets=7, n_boot=4, min_samples=2)
    seen: list[tuple[str, int]] = []

    def images_for(ck, prompts, seeds):
        seen.extend(zip(prompts, seeds))
        d = ws.samples_dir / f"twins-{ck}"
        d.mkdir(parents=True, exist_ok=True)
        out = []
        for j in range(len(prompts)):
            it = ref.eval_set.items[j // 2]
            arr = np.asarray(Image.open(it.path).convert("RGB")).astype(np.int16)
            arr[..., 2] = np.clip(arr[..., 2] + 20 * (j % 2), 0, 255)
            out.append(d / f"{j}.png")
            Image.fromarray(arr.astype(np.uint8)).save(out[-1])
        return out

    ref = E.prepare_reference(ws, store, spec)
    n = len(ref.eval_set.items)
    assert n == 10 and len(ref.plan) == 2 * n
    res = E.evaluate_checkpoint(ws, ref, "twins", images_for=images_for, checkpoint_sha256="sha-twins",
                                backbone="tiny")
    assert len(res.images) == len(seen) == 2 * n
    items = ref.eval_set.items
    assert [s for _, s in seen[::2]] == [it.seed for it in items]            # the first twin: the image's seed
    assert len({s for _, s in seen}) == 2 * n
    assert [p for p, _ in seen] == [class_seed_caption(store, "sample", it.label) for it in items for _ in (0, 1)]
    p = res.profile
    assert p["n_real"] == n and p["n_generated"] == 2 * n and p["per_image"] == 2 and p["caption_text"] == "class"
    assert p["extractor_epochs"] == 2 and p["prompt_set"] == E.PROMPT_SETS["class"]
    assert {c: v["n"] for c, v in res.metrics["per_class"].items()} == {"fundus_retina": 5, "histology_ihc": 5}
    assert np.isfinite(res.metrics["overall"]["fd"]) and len(res.metrics["overall"]["fd_ci"]) == 2
    back = E.spec_from_profile(p)
    for k in ("caption_text", "per_image", "extractor_epochs", "kid_subsets", "n_boot", "per_class", "captions"):
        assert getattr(back, k) == getattr(spec, k), k
    assert [(it.key, it.seed) for it in E.result_eval_items(ws, store, res)] == \
        [(items[i].key, s) for i, _, s in ref.plan]
    # A default spec records none of these settings: results made before they existed stay comparable.
    plain = E.make_profile(E.EvalSpec(dataset="sample"), ref.eval_set, ref.extractor, checkpoint="x",
                           checkpoint_sha256="x", backbone="tiny")
    assert not {"caption_text", "per_image", "extractor_dataset", "extractor_epochs"} & set(plain)
    with pytest.raises(ConfigError, match="caption_text"):
        E.EvalSpec(caption_text="vsg")

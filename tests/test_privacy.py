"""The privacy gauge: the calibrated copy threshold and the loss attack on constructed data (where the right
answer is known), and one real report of the tiny backbone through the library and the CLI handler."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medart_core import privacy as P


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("metric", ["cosine", "rms"])
def test_calibrated_threshold_flags_copies_and_not_fresh_draws(metric):
    train = torch.randn(60, 24, generator=_gen(0), dtype=torch.float64)
    held = torch.randn(50, 24, generator=_gen(1), dtype=torch.float64)
    copies = train[:10] + 1e-4 * torch.randn(10, 24, generator=_gen(2), dtype=torch.float64)
    fresh = torch.randn(40, 24, generator=_gen(3), dtype=torch.float64)
    res = P.copy_detection(torch.cat([copies, fresh]), train, held, metric=metric, quantile=0.01, top_k=5)
    flagged = {j for j, d in enumerate(res["distances"]) if d < res["threshold"]}
    assert set(range(10)) <= flagged, "every near-copy of a training image is flagged"
    assert len(flagged - set(range(10))) <= 2, "draws like the held-out images are (almost) never flagged"
    assert res["nearest"][:10] == list(range(10))
    # The threshold is the 1st percentile of the held-out images' own nearest-training distances.
    d_held, _ = P.nearest(held, train, metric)
    assert res["threshold"] == pytest.approx(float(torch.quantile(d_held, 0.01)))
    assert 0 < res["threshold"] <= float(d_held.median())
    assert [p["generated"] for p in res["top_pairs"]] == sorted(range(10), key=lambda j: res["distances"][j])[:5]
    lo, hi = res["copy_rate_ci"]
    assert lo <= res["copy_rate"] <= hi and res["n_copies"] == len(flagged)


def test_generated_identical_to_training_images_give_copy_rate_one():
    train = torch.rand(20, 3 * 8 * 8, generator=_gen(4), dtype=torch.float64)
    held = torch.rand(15, 3 * 8 * 8, generator=_gen(5), dtype=torch.float64)
    for metric in ("cosine", "rms"):
        res = P.copy_detection(train.clone(), train, held, metric=metric)
        assert res["copy_rate"] == 1.0 and res["n_copies"] == 20
        assert res["copy_rate_ci"][1] == 1.0 and res["copy_rate_ci"][0] > 0.8
        assert all(p["copy"] and p["distance"] == pytest.approx(0.0, abs=1e-12) for p in res["top_pairs"])


def test_threshold_needs_held_out_images():
    from medart_core.errors import ConfigError

    with pytest.raises(ConfigError, match="held-out"):
        P.calibrated_threshold(torch.zeros(0))


def test_attack_auc_is_one_when_members_have_lower_loss():
    rng = np.random.default_rng(0)
    members, non = rng.normal(0.10, 0.01, 30), rng.normal(0.20, 0.01, 40)
    res = P.membership_auc(members, non, n_boot=200, seed=0)
    assert res["auc"] == pytest.approx(1.0) and res["auc_ci"][0] > 0.95
    assert res["tpr_at_fpr_0.1"] == pytest.approx(1.0)
    assert res["member_loss_mean"] < res["non_member_loss_mean"]


def test_attack_auc_is_chance_for_one_distribution_and_reproducible():
    rng = np.random.default_rng(1)
    members, non = rng.normal(0.15, 0.03, 200), rng.normal(0.15, 0.03, 200)
    res = P.membership_auc(members, non, n_boot=300, seed=7)
    assert abs(res["auc"] - 0.5) < 0.08
    assert res["auc_ci"][0] < 0.5 < res["auc_ci"][1]
    assert P.membership_auc(members, non, n_boot=300, seed=7) == res, "the interval is reproducible from the seed"
    assert P.membership_auc(members, non, n_boot=300, seed=8)["auc_ci"] != res["auc_ci"]


def test_split_members_is_seeded_stratified_and_disjoint(ws, store):
    from training_data import make_dataset

    make_dataset(ws, store, "mini", n=10)
    ex = P.dataset_examples(ws, store, "mini")
    m, h = P.split_members(ex, 4, seed=3)
    assert len(m) == 4 and len(h) == 6 and not {e.key for e in m} & {e.key for e in h}
    assert sorted(e.label for e in m) == ["class0", "class0", "class1", "class1"]
    assert [e.key for e in P.split_members(ex, 4, seed=3)[0]] == [e.key for e in m]


def _spec(**kw):
    base = dict(seed=0, per_member=1, steps=2, timesteps=(100, 500), noise_draws=1, n_boot=50, batch_size=4,
                extractor="domain", extractor_dataset="mini", extractor_epochs=1, dinov2=None, precision="fp32")
    return P.PrivacySpec(**{**base, **kw})


def test_report_of_the_tiny_backbone_end_to_end_is_saved_and_reproducible(ws, store, one_thread):
    """Real generation and real denoising losses from the tiny random-weight backbone; saved JSON and pairs
    picture; the same numbers again from the same seed; the trainer's function agrees with the report."""
    from training_data import make_dataset

    from medart_core.backbone import load_backbone

    make_dataset(ws, store, "mini", n=8)
    members, held = P.split_members(P.dataset_examples(ws, store, "mini"), 4, seed=0)
    spec = _spec()
    rep = P.privacy_report(ws, store, "base", members, held, spec=spec, backbone="tiny")
    saved = json.loads((P.privacy_dir(ws) / f"{rep['id']}.json").read_text())
    assert saved["checkpoint"] == "base" and saved["random_weights"] is True
    assert Path(saved["pairs_image"]).is_file() and saved["members"]["n"] == 4 and saved["non_members"]["n"] == 4
    c, m = saved["copy"], saved["membership"]
    assert set(c["spaces"]) == {"domain", "pixel"} and c["primary"] == "pixel" and c["n_generated"] == 4
    assert 0.0 <= c["copy_rate"] <= 1.0 and c["copy_rate_ci"][0] <= c["copy_rate"] <= c["copy_rate_ci"][1]
    assert 0.0 <= m["auc"] <= 1.0 and len(m["member_losses"]) == 4 and all(x > 0 for x in m["non_member_losses"])
    assert saved["extractors_absent"] == {} and "domain" in saved["extractors"]

    again = P.privacy_report(ws, store, "base", members, held, spec=spec, backbone="tiny", save=False)
    for k in ("copy", "membership"):
        assert again[k] == rep[k], f"{k} is reproducible from the seed"
    other = P.privacy_report(ws, store, "base", members, held, spec=_spec(seed=1), backbone="tiny", save=False)
    assert other["membership"]["member_losses"] != rep["membership"]["member_losses"]

    bb = load_backbone("tiny")
    bb.transformer.train()
    px_spec = _spec(extractor="none")
    rate = P.validation_copy_rate(bb, members, held, spec=px_spec)
    assert rate == rep["copy"]["spaces"]["pixel"]["copy_rate"]
    assert bb.transformer.training, "the trainer's modules keep their training flags"
    assert [r["id"] for r in P.load_reports(ws)] == [rep["id"]]


class _PrivacyParser:
    """``python -m medart_core privacy …`` parsed by the CLI's own parser (the command prefix added)."""

    def __init__(self, parser):
        self.parser = parser

    def parse_args(self, argv):
        return self.parser.parse_args(["privacy", *argv])


def test_cli_handler_prints_one_json_report(ws, store, capsys, one_thread):
    from training_data import make_dataset

    make_dataset(ws, store, "mini", n=6)
    from medart_core.cli import build_parser

    p = _PrivacyParser(build_parser())
    args = p.parse_args(["--workspace", str(ws.root), "--checkpoint", "base", "--dataset", "mini", "--members", "3",
                         "--backbone", "tiny", "--steps", "2", "--per-member", "1", "--no-features", "--json"])
    assert P.cmd_privacy(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["checkpoint"] == "base" and out["members"]["n"] == 3 and out["non_members"]["n"] == 3
    assert set(out["copy"]["spaces"]) == {"pixel"}
    with pytest.raises(Exception, match="held-out"):
        P.cmd_privacy(p.parse_args(["--workspace", str(ws.root), "--checkpoint", "base", "--dataset", "mini",
                                    "--backbone", "tiny", "--no-features"]))


def test_curve_over_a_real_runs_checkpoints_uses_the_runs_own_split(ws, store, one_thread):
    """A 2-step cpu-smoke run on the tiny backbone: its members and hold-out rebuilt as the trainer split
    them, one report per checkpoint (and the base), and the curve saved; the CLI handler does the same."""
    from training_data import make_dataset

    from medart_core.train import TrainConfig, train

    make_dataset(ws, store, "mini", n=8)
    train(TrainConfig.from_preset("cpu-smoke", dataset="mini", captions="latest", max_steps=2, checkpoint_every=1,
                                  validate_every=100, val_images=3, export_merged=False), ws, store, run_name="r",
          log=lambda m: None)
    members, held = P.run_split(ws, store, "r")
    assert len(members) == 5 and len(held) == 3 and not {e.key for e in members} & {e.key for e in held}
    curve = P.privacy_curve(ws, store, "r", members, held, spec=_spec(extractor="none"))
    assert [p["checkpoint"] for p in curve["points"]] == ["base", "r@1", "r@2"]
    assert [p["step"] for p in curve["points"]] == [0, 1, 2]
    assert json.loads(Path(curve["path"]).read_text())["points"] == curve["points"]
    reports = {r["id"]: r for r in P.load_reports(ws)}
    assert {p["report"] for p in curve["points"]} <= set(reports)
    assert reports[curve["points"][1]["report"]]["checkpoint_sha256"] != "base"

    from medart_core.cli import build_parser

    p = _PrivacyParser(build_parser())
    assert P.cmd_privacy(p.parse_args(["--workspace", str(ws.root), "--checkpoint", "r@2", "--steps", "2",
                                       "--per-member", "1", "--no-features"])) == 0
    last = max(P.load_reports(ws), key=lambda r: r["id"])
    assert last["checkpoint"] == "r@2" and last["members"]["keys"] == [e.key for e in members]

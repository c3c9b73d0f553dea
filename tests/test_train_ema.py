"""EMA, post-hoc EMA and min-SNR-γ wired into the trainer (issue 19 §1, §4): the EMA of a real run equals the
hand-computed EMA of its raw trajectory, exact resume with the averages on, ``RUN@STEP:ema`` references in
generation and export, the clear error without EMA, ``ema reconstruct`` end to end, and min-SNR weights."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from training_data import REPO, TINY_RUN, make_dataset, subprocess_env, tiny_train_config

from medart_core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

EMA_RUN = dict(ema={"decay": 0.9, "posthoc": True, "sigma_rels": [0.05, 0.10]}, lr=1e-2)


def _ck_tensors(ws, run: str, step: int, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ws.run_dir(run) / "checkpoints" / f"step_{step:06d}" / f"{name}.safetensors"))


def _initial_adapters(cfg) -> dict:
    """The adapters as ``build_model`` initialises them (same seed right before ``attach_lora``)."""
    import torch

    from medart_core.backbone import load_backbone
    from medart_core.checkpoint import adapter_tensors
    from medart_core.lora import attach_lora

    bb = load_backbone(cfg.backbone)
    bb.resolution = int(cfg.resolution or bb.resolution)
    torch.manual_seed(cfg.seed)
    attach_lora(bb, cfg.lora)
    return {k: v.detach().float().clone() for k, v in adapter_tensors(bb).items()}


# ---- config -------------------------------------------------------------------------------------------
def test_ema_and_snr_options_are_config_fields_and_flags():
    import argparse

    from medart_core.train_config import TrainConfig, add_config_arguments, merge_config, overrides_from_args

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    over = overrides_from_args(p.parse_args(["--ema.decay", "0.999", "--ema.posthoc", "--ema.snapshot-every",
                                             "50", "--snr-gamma", "5"]))
    cfg = TrainConfig.from_dict(merge_config(TrainConfig().to_dict(), over))
    assert (cfg.ema.decay, cfg.ema.posthoc, cfg.ema.snapshot_every, cfg.snr_gamma) == (0.999, True, 50, 5.0)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    off = TrainConfig()
    assert not off.ema.enabled and not off.ema.posthoc and off.snr_gamma is None   # off by default
    with pytest.raises(ConfigError, match="ema.decay"):
        TrainConfig.from_dict({"ema": {"decay": 1.0}})
    with pytest.raises(ConfigError, match="snr_gamma"):
        TrainConfig.from_dict({"snr_gamma": 0})
    with pytest.raises(ConfigError, match="needs an EMA"):
        TrainConfig.from_dict({"ema": {"validate_with": "ema"}})
    with pytest.raises(ConfigError, match="Unknown ema config keys"):
        TrainConfig.from_dict({"ema": {"length": 3}})


# ---- EMA in a real run --------------------------------------------------------------------------------
def test_ema_of_a_run_is_the_ema_of_its_raw_trajectory(ws, store):
    import torch

    from medart_core.ema import EMA
    from medart_core.train import train

    make_dataset(ws, store)
    cfg = tiny_train_config(max_steps=3, checkpoint_every=1, keep_checkpoints=5, **EMA_RUN)
    train(cfg, ws, store, run_name="e")
    raw = [_initial_adapters(cfg)] + [_ck_tensors(ws, "e", s, "adapters") for s in (1, 2, 3)]
    assert set(raw[0]) == set(raw[1])
    hand = {k: v.clone() for k, v in raw[0].items()}
    e = EMA(raw[0], 0.9)          # only for its warm-up schedule
    for t in range(3):
        d = e.decay_at(t)
        for k in hand:
            hand[k] = d * hand[k] + (1.0 - d) * raw[t + 1][k].float()
        got = _ck_tensors(ws, "e", t + 1, "ema")
        assert sorted(got) == sorted(hand)
        for k in hand:
            torch.testing.assert_close(got[k], hand[k], rtol=1e-6, atol=1e-7)
    last = _ck_tensors(ws, "e", 3, "ema")
    assert any(not torch.equal(last[k], raw[3][k].float()) for k in last), "EMA equals the raw weights"
    state = json.loads((ws.run_dir("e") / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["ema"]["num_updates"] == 3 and state["posthoc_ema"]["t"] == 3
    assert state["provenance"]["ema"]["decay"] == 0.9
    snaps = sorted(p.name for p in (ws.run_dir("e") / "ema").glob("phema-*.safetensors"))
    assert len(snaps) == 6   # one per checkpoint and profile


def test_in_process_resume_with_ema_is_bitwise_identical(ws, store):
    import torch

    from medart_core.train import train

    make_dataset(ws, store)
    cfg = dict(TINY_RUN, max_steps=6, checkpoint_every=1, keep_checkpoints=2, **EMA_RUN)
    from medart_core.train import TrainConfig

    train(TrainConfig.from_dict(cfg), ws, store, run_name="full")
    train(TrainConfig.from_dict(dict(cfg, max_steps=4)), ws, store, run_name="cut")
    res = train(TrainConfig.from_dict(cfg), ws, store, resume="cut")
    assert res.step == 6
    for name in ("adapters", "optimizer", "ema", "posthoc_ema"):
        a, b = _ck_tensors(ws, "full", 6, name), _ck_tensors(ws, "cut", 6, name)
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    for p in sorted((ws.run_dir("full") / "ema").glob("phema-*.safetensors")):
        assert (ws.run_dir("cut") / "ema" / p.name).read_bytes() == p.read_bytes(), p.name
    with pytest.raises(ConfigError, match="Cannot resume with a different ema"):
        train(TrainConfig.from_dict(dict(cfg, max_steps=8, ema={"decay": 0.5})), ws, store, resume="cut")


@pytest.mark.slow
def test_sigkill_then_resume_with_ema_is_bitwise_identical(ws, store, tmp_path):
    import torch
    from test_resume import _run_and_kill, _train_cmd

    make_dataset(ws, store)
    steps = 8
    cfgf = tmp_path / "cfg.json"
    cfgf.write_text(json.dumps(dict(TINY_RUN, max_steps=steps, checkpoint_every=1, keep_checkpoints=2, **EMA_RUN)))
    full = subprocess.run(_train_cmd(ws, "--config", str(cfgf), "--run", "full"), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    metrics = ws.run_dir("cut") / "metrics.jsonl"
    _run_and_kill(_train_cmd(ws, "--config", str(cfgf), "--run", "cut"), metrics, 4, tmp_path / "log")
    last = subprocess.run(_train_cmd(ws, "--resume", "cut"), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert last.returncode == 0, last.stderr[-3000:]
    for name in ("adapters", "optimizer", "ema", "posthoc_ema"):
        a, b = _ck_tensors(ws, "full", steps, name), _ck_tensors(ws, "cut", steps, name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
    for p in sorted((ws.run_dir("full") / "ema").glob("phema-*.safetensors")):
        assert (ws.run_dir("cut") / "ema" / p.name).read_bytes() == p.read_bytes(), p.name


# ---- references ---------------------------------------------------------------------------------------
def test_ema_references_generation_export_and_reconstruct(ws, store, tmp_path):
    from safetensors.torch import load_file

    from medart_core.cli import main
    from medart_core.export import export_model
    from medart_core.generate import GenerationRequest, Generator, list_checkpoint_refs, resolve_checkpoint
    from medart_core.train import train

    make_dataset(ws, store)
    train(tiny_train_config(max_steps=4, checkpoint_every=2, **EMA_RUN), ws, store, run_name="e")
    train(tiny_train_config(max_steps=2, checkpoint_every=2), ws, store, run_name="plain")
    assert [r for r in list_checkpoint_refs(ws) if r.startswith("e@")] == ["e@2", "e@2:ema", "e@4", "e@4:ema"]

    raw, ema, latest = (resolve_checkpoint(ws, r) for r in ("e@4", "e@4:ema", "e:ema"))
    assert (raw.weights, ema.weights, latest.ref) == ("raw", "ema", "e@4:ema")
    assert raw.adapters_path.name == "adapters.safetensors" and ema.adapters_path.name == "ema.safetensors"
    assert raw.sha256 != ema.sha256
    with pytest.raises(ConfigError, match="trained without --ema.decay"):
        resolve_checkpoint(ws, "plain@2:ema")
    with pytest.raises(ConfigError, match="without --ema.posthoc"):
        resolve_checkpoint(ws, "plain@2:ema-0.08")
    with pytest.raises(ConfigError, match="ema reconstruct"):
        resolve_checkpoint(ws, "e@4:ema-0.08")
    with pytest.raises(ConfigError, match="Unknown weights"):
        resolve_checkpoint(ws, "e@4:best")
    with pytest.raises(ConfigError, match="base model has no EMA"):
        resolve_checkpoint(ws, "base:ema")

    gen = Generator(ws, "tiny")
    req = dict(prompts=["An image of class 0"], steps=2, seed=3, n=1)
    a = gen.generate(GenerationRequest(**req, checkpoint="e@4"))[0]
    b = gen.generate(GenerationRequest(**req, checkpoint="e@4:ema"))[0]
    sa, sb = json.loads(a.sidecar.read_text()), json.loads(b.sidecar.read_text())
    assert (sa["weights"], sa["checkpoint"]) == ("raw", "e@4")
    assert (sb["weights"], sb["checkpoint"], sb["adapters_sha256"]) == ("ema", "e@4:ema", ema.sha256)
    assert a.path.read_bytes() != b.path.read_bytes()
    assert gen.regenerate(b.sidecar).settings["matches_original"]

    # post-hoc EMA: reconstruct through the CLI, then name it in a reference
    assert main(["ema", "reconstruct", "--workspace", str(ws.root), "--run", "e", "--sigma-rel", "0.08"]) == 0
    rec = resolve_checkpoint(ws, "e@4:ema-0.08")
    assert rec.weights == "ema-0.08" and rec.adapters_path.is_file()
    report = json.loads(rec.adapters_path.with_suffix(".json").read_text())
    assert report["ref"] == "e@4:ema-0.08" and report["step"] == 4 and report["fit_error"] < 0.5
    c = gen.generate(GenerationRequest(**req, checkpoint="e@4:ema-0.08"))[0]
    assert json.loads(c.sidecar.read_text())["weights"] == "ema-0.08"
    assert main(["ema", "reconstruct", "--workspace", str(ws.root), "--run", "plain", "--sigma-rel", "0.1"]) == 2

    # export of the EMA weights: the exported adapters are the EMA tensors
    out = export_model(ws, "e", tmp_path / "exp", merged=False, weights="ema")
    assert out
    exported = [p for p in (tmp_path / "exp").rglob("*.safetensors")]
    assert exported
    ema_t = load_file(str(ema.adapters_path))
    got = {}
    for p in exported:
        got.update(load_file(str(p)))
    n_dit = sum(1 for k in ema_t if k.startswith("dit::"))
    assert len(got) == len(ema_t) and n_dit


def test_ema_reconstruct_cli_subprocess(ws, store):
    """``python -m medart_core ema reconstruct --json`` as a user runs it."""
    from medart_core.train import train

    make_dataset(ws, store)
    train(tiny_train_config(max_steps=3, checkpoint_every=3, ema={"posthoc": True, "snapshot_every": 1}),
          ws, store, run_name="p")
    r = subprocess.run([sys.executable, "-m", "medart_core", "ema", "reconstruct", "--workspace", str(ws.root),
                        "--run", "p", "--sigma-rel", "0.1", "--json"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    # a tracked profile at a snapshot step is reconstructed exactly
    assert rep["ref"] == "p@3:ema-0.1" and rep["snapshots"] == 6 and rep["fit_error"] < 1e-6


# ---- min-SNR-γ ----------------------------------------------------------------------------------------
def _latent_inputs():
    import torch

    from medart_core.backbone import load_backbone
    from medart_core.pixart import encode_prompts, tokenize_prompts

    bb = load_backbone("tiny")
    torch.manual_seed(0)
    lat = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        emb, mask = encode_prompts(bb, *tokenize_prompts(bb.tokenizer, ["a", "b c", "d"], max_length=16))
    return bb, lat, emb, mask


def test_min_snr_off_is_the_plain_mse_and_on_weights_each_sample():
    import torch

    from medart_core.hldf import latent_loss
    from medart_core.loss_weighting import min_snr_weights, snr
    from medart_core.sampling import alphas_cumprod

    bb, lat, emb, mask = _latent_inputs()
    cfgs = bb.scheduler.config

    def run(**kw):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return latent_loss(bb.transformer, lat, emb, mask, generator=g, scheduler_config=cfgs, **kw)

    plain, off = run(), run(snr_gamma=None)
    assert torch.equal(plain, off)
    per = run(per_sample=True)
    assert per.shape == (3,)
    torch.testing.assert_close(per.mean(), plain, rtol=1e-6, atol=0)
    t = torch.randint(0, alphas_cumprod(cfgs).shape[0], (3,), generator=torch.Generator().manual_seed(5))
    gamma = float(snr(t, cfgs).median())   # between the samples' SNRs: some weights < 1, not all
    w = min_snr_weights(t, cfgs, gamma)
    assert (w < 1).any()
    weighted = run(snr_gamma=gamma)
    torch.testing.assert_close(weighted, (per * w).mean(), rtol=1e-6, atol=0)
    assert not torch.equal(weighted, plain)


def test_min_snr_in_training_changes_the_latent_loss_only_when_on(ws, store):
    from medart_core.train import train

    make_dataset(ws, store)
    base = dict(max_steps=2, checkpoint_every=2)
    off = train(tiny_train_config(**base), ws, store, run_name="off")
    # γ below every SNR of the schedule (ᾱ_T ≈ 4e-5): every weight is γ/SNR < 1, so each step's loss changes
    on = train(tiny_train_config(**base, snr_gamma=1e-6), ws, store, run_name="on")
    rows = {r.run: [json.loads(x) for x in r.metrics_path.read_text().splitlines()] for r in (off, on)}
    lat = {k: [r["loss_latent"] for r in v if "loss_latent" in r] for k, v in rows.items()}
    assert len(lat["off"]) == len(lat["on"]) == 2
    assert all(a != b for a, b in zip(lat["off"], lat["on"]))
    cfg = json.loads((ws.run_dir("on") / "config.json").read_text())
    assert cfg["snr_gamma"] == 1e-6


def test_ema_sweep_evaluates_lengths_and_recommends_one(ws, store, capsys):
    from medart_core.cli import main
    from medart_core.train import train

    make_dataset(ws, store, n=8, size=(64, 64))
    train(tiny_train_config(max_steps=4, checkpoint_every=4, resolution=64, ema={"posthoc": True}, lr=1e-2),
          ws, store, run_name="s")
    rc = main(["ema", "sweep", "--workspace", str(ws.root), "--run", "s", "--lengths", "0.05,0.15", "--dataset",
               "mini", "--captions", "latest", "--per-class", "4", "--steps", "2", "--n-boot", "10",
               "--size", "32", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "s@4:ema-0.05" in out and "s@4:ema-0.15" in out and "recommended:" in out
    rec = json.loads(out.strip().splitlines()[-1])["recommended"]
    assert rec["checkpoint"] in ("s@4", "s@4:ema-0.05", "s@4:ema-0.15") and len(rec["fd_ci"]) == 2


@pytest.mark.slow
def test_two_cpu_ranks_with_ema_rank0_keeps_the_average(ws, store, tmp_path, free_port):
    """Data-parallel with EMA and post-hoc EMA on: both ranks end with the same adapters, rank 0 alone holds
    and saves the averages, updated once per optimiser step."""
    import torch
    from test_ddp import run_two_ranks

    from medart_core.checkpoint import read_checkpoint

    make_dataset(ws, store, n=7)
    cfg = tiny_train_config(lora={"rank": 2, "alpha": 2.0}, validate_every=100, lr=1e-2, **{"ema": EMA_RUN["ema"]})
    out, _ = run_two_ranks(ws, tmp_path, cfg, free_port())
    from safetensors.torch import load_file

    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state, tensors = read_checkpoint(ws.run_dir("ddp") / "checkpoints" / "step_000004")
    assert state["world_size"] == 2 and state["ema"]["num_updates"] == 4 and state["posthoc_ema"]["t"] == 4
    assert sorted(tensors["ema"]) == sorted(tensors["adapters"])
    assert any(not torch.equal(tensors["ema"][k], tensors["adapters"][k].float()) for k in tensors["ema"])
    assert len(list((ws.run_dir("ddp") / "ema").glob("phema-000000004-*.safetensors"))) == 2


def test_validation_with_the_ema_leaves_the_raw_weights_bitwise(ws, store):
    """``--ema.validate-with ema`` renders the grid with the EMA swapped in and the raw weights put back exactly:
    the run's adapters are bitwise those of the same run validating with the raw weights."""
    import torch

    from medart_core.train import train

    make_dataset(ws, store)
    base = dict(max_steps=4, checkpoint_every=4, validate_every=2, ema={"decay": 0.9}, lr=1e-2)
    raw = train(tiny_train_config(**base), ws, store, run_name="vr")
    ema = train(tiny_train_config(**dict(base, ema={"decay": 0.9, "validate_with": "ema"})), ws, store,
                run_name="ve")
    assert len(raw.validation_grids) == len(ema.validation_grids) == 2
    for name in ("adapters", "ema"):
        a, b = _ck_tensors(ws, "vr", 4, name), _ck_tensors(ws, "ve", 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    val = {r: [json.loads(x)["val_loss"] for x in (ws.run_dir(r) / "metrics.jsonl").read_text().splitlines()
               if "val_loss" in x] for r in ("vr", "ve")}
    assert val["vr"] != val["ve"]   # the EMA was validated, not the raw weights

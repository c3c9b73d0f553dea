"""EMA with warm-up, post-hoc (power-function) EMA and its reconstruction, and min-SNR-γ loss weights."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from medart_core import ema as E
from medart_core import loss_weighting as W
from medart_core.errors import ConfigError, NotFoundError


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(4, 3, generator=g), "a.lora_B": torch.randn(3, 4, generator=g),
            "b.magnitude": torch.randn(5, generator=g)}


def _step_params(params: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """A stand-in optimiser step: a seeded random move of every tensor."""
    for p in params.values():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- classic EMA ------------------------------------------------------------------------------------------
def test_warmup_decay_at_steps_0_1_10_and_plateau():
    e = E.EMA(_params(), decay=0.999)
    assert e.decay_at(0) == pytest.approx(1 / 10)
    assert e.decay_at(1) == pytest.approx(2 / 11)
    assert e.decay_at(10) == pytest.approx(11 / 20)
    assert e.decay_at(100_000) == 0.999                       # min(decay, ...) once warm-up has passed
    assert E.EMA(_params(), decay=0.999, warmup=False).decay_at(0) == 0.999
    with pytest.raises(ConfigError):
        E.EMA(_params(), decay=1.0)


def test_update_is_the_ema_recurrence_with_the_warmup_decay():
    start, p = _params(0), _params(1)
    e = E.EMA(start, decay=0.99)
    assert e.update(p, 0) == pytest.approx(0.1)
    for k in p:
        torch.testing.assert_close(e.shadow[k], 0.1 * start[k] + 0.9 * p[k])
    q = _params(2)
    e.update(q, 1)
    for k in p:
        torch.testing.assert_close(e.shadow[k], (2 / 11) * (0.1 * start[k] + 0.9 * p[k]) + (9 / 11) * q[k])
    assert e.num_updates == 2 and e.last_step == 1
    with pytest.raises(ConfigError):
        e.update({"other": torch.zeros(1)}, 2)


def test_state_round_trip_through_safetensors_and_json_is_bitwise_and_resumes_exactly(tmp_path):
    params, gen = _params(), torch.Generator().manual_seed(5)
    e = E.EMA(params, decay=0.995)
    for step in range(7):
        _step_params(params, gen)
        e.update(params, step)
    tensors, meta = e.state_dict()
    save_file(tensors, str(tmp_path / "ema.safetensors"))
    (tmp_path / "ema.json").write_text(json.dumps(meta))

    resumed_params = {k: v.clone() for k, v in params.items()}
    resumed = E.EMA(_params(9), decay=0.995)                   # built from other weights, then loaded
    resumed.load_state_dict(load_file(str(tmp_path / "ema.safetensors")),
                            json.loads((tmp_path / "ema.json").read_text()))
    assert _equal(resumed.shadow, e.shadow)
    assert (resumed.num_updates, resumed.last_step) == (7, 6)
    gen_a, gen_b = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    for step in range(7, 12):                                   # both runs go on: still bit for bit equal
        _step_params(params, gen_a)
        _step_params(resumed_params, gen_b)
        e.update(params, step)
        resumed.update(resumed_params, step)
    assert _equal(resumed.shadow, e.shadow)

    with pytest.raises(ConfigError, match="decay"):
        E.EMA(_params(), decay=0.9).load_state_dict(tensors, meta)
    with pytest.raises(ConfigError):
        E.EMA({"x": torch.zeros(2)}, decay=0.995).load_state_dict(tensors, meta)


def test_swap_into_restores_the_raw_weights_bitwise_even_when_the_block_raises():
    params, gen = _params(), torch.Generator().manual_seed(1)
    e = E.EMA(params, decay=0.9)
    for step in range(5):
        _step_params(params, gen)
        e.update(params, step)
    raw = {k: v.clone() for k, v in params.items()}
    with e.swap_into(params):
        assert _equal(params, e.shadow) and not _equal(params, raw)
    assert _equal(params, raw)
    with pytest.raises(RuntimeError, match="boom"):
        with e.swap_into(params):
            raise RuntimeError("boom")
    assert _equal(params, raw)
    e.copy_to(params)
    assert _equal(params, e.shadow) and _equal(e.averaged(), e.shadow)


def _lora_module() -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"]), m)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    return m


def test_ema_on_a_peft_lora_module_touches_only_the_trainable_weights():
    m = _lora_module()
    tracked = E.trainable_named_parameters(m)
    assert tracked and all("lora_" in n for n in tracked)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    e = E.EMA(tracked, decay=0.9)
    opt = torch.optim.SGD(list(tracked.values()), lr=0.1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    for step in range(6):
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        opt.zero_grad()
        e.update(tracked, step)
    assert set(e.shadow) == set(tracked)
    raw_out = m(x).detach()
    raw = {n: p.detach().clone() for n, p in m.named_parameters()}
    with e.swap_into(tracked):
        ema_out = m(x).detach()
        for n, p in m.named_parameters():
            assert torch.equal(p, e.shadow[n] if n in tracked else raw[n]), n   # frozen weights untouched
    assert not torch.equal(ema_out, raw_out)
    assert all(torch.equal(p, raw[n]) for n, p in m.named_parameters())
    assert torch.equal(m(x).detach(), raw_out)
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_parameters_are_keyed_like_checkpoint_adapter_tensors(use_dora):
    from medart_core import checkpoint as C
    from medart_core import lora as L
    from medart_core.backbone import load_backbone

    b = L.attach_lora(load_backbone("tiny"), L.LoRAConfig(rank=2, use_dora=use_dora))
    live = E.adapter_parameters(b)
    saved = C.adapter_tensors(b)
    assert set(live) == set(saved) and all(torch.equal(live[k].detach(), saved[k]) for k in saved)
    assert {id(p) for p in live.values()} == {id(p) for p in L.trainable_parameters(b)}
    e = E.EMA(live, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in live.values():
            p.add_(1.0)
    e.update(live, 0)                                           # shadow = raw + 0.5
    C.load_adapter_tensors(b, e.averaged())                     # the "RUN@STEP:ema" load path
    for k in saved:
        torch.testing.assert_close(live[k].detach(), saved[k] + 0.5)


# ---- power-function profiles ----------------------------------------------------------------------------
def test_sigma_rel_to_gamma_solves_the_edm2_relation():
    assert E.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)    # EDM2's two tracked profiles
    assert E.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.03, 0.07, 0.15, 0.25):
        assert E.gamma_to_sigma_rel(E.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ConfigError):
            E.sigma_rel_to_gamma(bad)


T_STEPS = 600


def _trajectory(s: int) -> torch.Tensor:
    """A known "parameter" path: drift, a slow wave and a decaying fast wave (values of order 1)."""
    return torch.tensor([s / T_STEPS, math.sin(s / 60.0), math.cos(s / 23.0) * math.exp(-s / 300.0)])


def _power_ema(sigma_rel: float, t: int) -> torch.Tensor:
    """The power-function EMA at ``t`` steps done, straight from its weights: step ``s`` gets
    ``∫_{s-1}^{s} (γ+1) τ^γ / t^(γ+1) dτ`` (EDM2 eq. 1 for weights held constant within a step)."""
    g = E.sigma_rel_to_gamma(sigma_rel)
    out = torch.zeros(3, dtype=torch.float64)
    for s in range(1, t + 1):
        out += ((s / t) ** (g + 1) - ((s - 1) / t) ** (g + 1)) * _trajectory(s).double()
    return out


@pytest.fixture(scope="module")
def trajectory_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phema")
    p = {"w": torch.zeros(3)}
    ph = E.PostHocEMA(p, snapshot_every=25, folder=folder)
    written = []
    for step in range(T_STEPS):
        p["w"].copy_(_trajectory(step + 1))
        written += ph.update(p, step)
    return folder, ph, written


def test_tracked_profiles_are_power_function_emas_and_snapshots_are_listed(trajectory_run):
    folder, ph, written = trajectory_run
    assert len(written) == 2 * (T_STEPS // 25)
    snaps = E.list_snapshots(folder)
    assert [s.step for s in snaps[:4]] == [25, 25, 50, 50] and snaps[-1].step == T_STEPS
    assert {s.sigma_rel for s in snaps} == {0.05, 0.10}
    assert {s.gamma for s in snaps} == set(ph.gammas)
    for s in (0.05, 0.10):
        torch.testing.assert_close(ph.averaged(s)["w"].double(), _power_ema(s, T_STEPS), atol=1e-5, rtol=0)


def test_reconstructing_a_tracked_profile_gives_that_profile(trajectory_run):
    folder, ph, _ = trajectory_run
    for s in (0.05, 0.10):
        rep = E.reconstruction_report(folder, s)
        assert rep["fit_error"] < 1e-6 and rep["step"] == T_STEPS
        torch.testing.assert_close(E.reconstruct(folder, s)["w"], ph.averaged(s)["w"], atol=1e-6, rtol=0)
    mid = [x for x in E.list_snapshots(folder) if x.step == 300 and x.sigma_rel == 0.10][0]
    torch.testing.assert_close(E.reconstruct(folder, 0.10, at_step=300)["w"], load_file(str(mid.path))["w"],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma_rel", [0.07, 0.15])
def test_reconstructed_ema_matches_a_direct_power_function_ema(trajectory_run, sigma_rel):
    folder, _, _ = trajectory_run
    rec = E.reconstruct(folder, sigma_rel)["w"].double()
    torch.testing.assert_close(rec, _power_ema(sigma_rel, T_STEPS), atol=2e-4, rtol=0)
    assert E.reconstruction_report(folder, sigma_rel)["fit_error"] < 0.01
    rec_mid = E.reconstruct(folder, sigma_rel, at_step=400)["w"].double()   # only snapshots up to step 400
    torch.testing.assert_close(rec_mid, _power_ema(sigma_rel, 400), atol=2e-4, rtol=0)
    with pytest.raises(NotFoundError):
        E.reconstruct(folder, sigma_rel, at_step=10)


def test_posthoc_state_resumes_bitwise_and_rewrites_identical_snapshots(tmp_path):
    params, gen = _params(), torch.Generator().manual_seed(2)
    a = E.PostHocEMA(params, snapshot_every=10, folder=tmp_path / "a")
    for step in range(20):
        _step_params(params, gen)
        a.update(params, step)
    tensors, meta = a.state_dict()
    save_file(tensors, str(tmp_path / "phema.safetensors"))
    resumed_params = {k: v.clone() for k, v in params.items()}
    b = E.PostHocEMA(_params(4), snapshot_every=10, folder=tmp_path / "b")
    b.load_state_dict(load_file(str(tmp_path / "phema.safetensors")), json.loads(json.dumps(meta)))
    gen_a, gen_b = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    for step in range(20, 30):
        _step_params(params, gen_a)
        _step_params(resumed_params, gen_b)
        a.update(params, step)
        b.update(resumed_params, step)
    for s in (0.05, 0.10):
        name = E.snapshot_name(30, s)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert _equal(a.averaged(s), b.averaged(s))
    with pytest.raises(ConfigError):
        a.update(params, 29)                                    # steps must increase
    with pytest.raises(ConfigError):
        E.PostHocEMA(_params(), sigma_rels=(0.05, 0.2)).load_state_dict(tensors, meta)


def test_posthoc_swap_into_restores_raw_weights():
    params, gen = _params(), torch.Generator().manual_seed(3)
    ph = E.PostHocEMA(params)
    for step in range(4):
        _step_params(params, gen)
        ph.update(params, step)
    raw = {k: v.clone() for k, v in params.items()}
    with ph.swap_into(params, 0.10):
        assert _equal(params, ph.averaged(0.10))
    assert _equal(params, raw)
    with pytest.raises(ConfigError):
        ph.averaged(0.2)


# ---- min-SNR-γ ------------------------------------------------------------------------------------------
def _hand_snr(t: list[int]) -> torch.Tensor:
    """SNR of PixArt's DDPM schedule (linear β 1e-4..0.02, T = 1000), computed here in float64."""
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    acp, out = 1.0, []
    for b in betas:
        acp *= 1.0 - b
        out.append(acp / (1.0 - acp))
    return torch.tensor([out[i] for i in t], dtype=torch.float64)


def test_min_snr_weights_against_hand_computed_snr_of_a_ddpm_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    t = [0, 1, 10, 100, 250, 500, 750, 999]
    snr = _hand_snr(t)
    got = W.snr(torch.tensor(t), sched)
    # The scheduler's ᾱ is float32: near t = 0, 1 - ᾱ ≈ 1e-4 keeps only ~3 significant digits of it.
    torch.testing.assert_close(got.double(), snr, rtol=3e-4, atol=0)
    a = sched.alphas_cumprod.double()[t]                       # exactly the ᾱ the training noise uses
    torch.testing.assert_close(got.double(), a / (1 - a), rtol=1e-6, atol=0)
    gamma = 5.0
    clipped = snr.clamp(max=gamma)
    cases = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
    for kind, want in cases.items():
        w = W.min_snr_weights(torch.tensor(t), sched, gamma, prediction_type=kind)
        assert w.dtype == torch.float32 and w.shape == (len(t),)
        torch.testing.assert_close(w.double(), want, rtol=3e-4, atol=1e-7)
    eps = W.min_snr_weights(torch.tensor(t), sched, gamma)
    assert eps[0] < 0.01 and eps[-1] == 1.0                     # low-noise steps damped, high-noise steps kept
    from_config = W.min_snr_weights(torch.tensor(t), dict(sched.config), gamma)   # the hldf scheduler_config path
    torch.testing.assert_close(from_config, eps)


def test_min_snr_zero_terminal_snr_and_bad_arguments():
    acp = torch.tensor([0.99, 0.5, 0.0])
    w = W.min_snr_weights(torch.tensor([0, 1, 2]), acp, 5.0)
    assert torch.isfinite(w).all() and w[2] == 1.0 and w[1] == 1.0   # SNR 1 < γ: weight 1; SNR 0: the limit
    torch.testing.assert_close(w[0], torch.tensor(5.0 / 99.0))
    with pytest.raises(ConfigError):
        W.min_snr_weights(torch.tensor([0]), acp, 0.0)
    with pytest.raises(ConfigError):
        W.min_snr_weights(torch.tensor([0]), acp, 5.0, prediction_type="flow")
    with pytest.raises(ConfigError):
        W.min_snr_weights(torch.tensor([3]), acp, 5.0)
    with pytest.raises(ConfigError):
        W.snr(torch.tensor([0]), object())

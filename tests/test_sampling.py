"""The differentiable DPM-Solver++(2M) against diffusers' scheduler and the stock PixArt pipeline."""
from __future__ import annotations

import pytest
import torch

from medart_core import pixart as P
from medart_core import sampling as S
from medart_core.errors import ConfigError

PROMPTS = ["A CT image of the abdomen", "An endoscopic image of a polyp"]


@pytest.fixture(scope="module")
def bb():
    from medart_core.backbone import load_backbone

    return load_backbone("tiny")


def _pipe(bb):
    p = bb.pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 20, 50])
def test_schedule_matches_scheduler_set_timesteps(bb, steps):
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler.from_config(bb.scheduler.config)
    ref.set_timesteps(steps)
    ours = S.dpm_schedule(bb.scheduler.config, steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert len(ours) == steps and ours.sigmas[-1] == 0


@pytest.mark.parametrize("key,value", [("use_karras_sigmas", True), ("algorithm_type", "sde-dpmsolver++"),
                                       ("solver_order", 3), ("prediction_type", "v_prediction")])
def test_unsupported_scheduler_options_are_refused(bb, key, value):
    cfg = dict(bb.scheduler.config)
    cfg[key] = value
    with pytest.raises(ConfigError):
        S.dpm_schedule(cfg, 20)


def test_matches_stock_pipeline_20_steps(bb):
    """Same components, prompts, seed, 20 steps, CFG 4.5: images equal the stock pipeline's to 1e-4."""
    pipe = _pipe(bb)
    kw = dict(num_inference_steps=20, guidance_scale=4.5, height=bb.resolution, width=bb.resolution,
              use_resolution_binning=False, clean_caption=False)
    ref_lat = pipe(PROMPTS, generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images
    ref_img = pipe(PROMPTS, generator=torch.Generator().manual_seed(7), output_type="pt", **kw).images

    emb, mask = P.encode_text(bb, PROMPTS)
    neg, nmask = P.encode_text(bb, ["", ""])
    lat = P.sample_latents(bb, emb, mask, neg, nmask, steps=20, guidance=4.5,
                          generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        img = (P.decode(bb.vae, lat) / 2 + 0.5).clamp(0, 1)  # the pipeline's "pt" post-processing
    assert lat.shape == ref_lat.shape == (2, 4, bb.latent_size, bb.latent_size)
    assert ref_img.std() > 0.01  # a non-degenerate image, or the comparison says nothing
    assert (lat - ref_lat).abs().max().item() <= 1e-4 * max(1.0, ref_lat.abs().max().item())
    assert (img - ref_img).abs().max().item() <= 1e-4


def test_negative_prompt_encoded_on_the_fly_matches_pipeline(bb):
    pipe = _pipe(bb)
    ref = pipe(PROMPTS[0], num_inference_steps=4, guidance_scale=4.5, height=bb.resolution, width=bb.resolution,
               use_resolution_binning=False, clean_caption=False, output_type="latent",
               generator=torch.Generator().manual_seed(3)).images
    emb, mask = P.encode_text(bb, PROMPTS[:1])
    lat = P.sample_latents(bb, emb, mask, steps=4, guidance=4.5, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(lat, ref, rtol=0, atol=1e-4 * max(1.0, ref.abs().max().item()))


def test_no_state_kept_between_calls(bb):
    before = (bb.scheduler.timesteps.clone(), getattr(bb.scheduler, "_step_index", None),
              dict(bb.scheduler.config))
    emb, mask = P.encode_text(bb, PROMPTS)
    neg, nmask = P.encode_text(bb, ["", ""])
    a = P.sample_latents(bb, emb, mask, neg, nmask, steps=3, generator=torch.Generator().manual_seed(1))
    # a different call in between must not leak into the next one
    P.sample_latents(bb, emb, mask, neg, nmask, steps=5, guidance=2.0, generator=torch.Generator().manual_seed(9))
    b = P.sample_latents(bb, emb, mask, neg, nmask, steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(bb.scheduler.timesteps, before[0])
    assert getattr(bb.scheduler, "_step_index", None) == before[1]
    assert dict(bb.scheduler.config) == before[2]


def test_grad_modes(bb):
    """'none' builds no graph; 'full' reaches the initial noise; 'truncated' K<M does not; K=M equals full."""
    from medart_core.backbone import load_backbone

    b = load_backbone("tiny")
    b.transformer.requires_grad_(True)
    emb, mask = P.encode_text(b, PROMPTS[:1])
    neg, nmask = P.encode_text(b, [""])
    noise = torch.randn(1, 4, b.latent_size, b.latent_size, generator=torch.Generator().manual_seed(0))

    out = P.sample_latents(b, emb, mask, neg, nmask, steps=4, latents=noise, grad_mode="none")
    assert not out.requires_grad

    def run(mode, k=2, ckpt=False):
        x = noise.clone().requires_grad_(True)
        b.transformer.zero_grad(set_to_none=True)
        calls = []
        h = b.transformer.register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
        try:
            lat = P.sample_latents(b, emb, mask, neg, nmask, steps=4, latents=x, grad_mode=mode, truncated_k=k,
                                  checkpoint=ckpt)
        finally:
            h.remove()
        lat.square().mean().backward()
        g = torch.cat([p.grad.flatten() for p in b.transformer.parameters() if p.grad is not None])
        return x.grad, g, calls

    xg_full, g_full, calls_full = run("full")
    assert xg_full is not None and xg_full.abs().sum() > 0
    assert calls_full == [True] * 4
    xg_tr, g_tr, calls_tr = run("truncated", k=2)
    assert xg_tr is None  # the early trajectory is a constant
    assert calls_tr == [False, False, True, True]
    assert not torch.allclose(g_tr, g_full)
    _, g_km, _ = run("truncated", k=4)
    torch.testing.assert_close(g_km, g_full, rtol=1e-6, atol=0)
    xg_ck, g_ck, _ = run("full", ckpt=True)
    torch.testing.assert_close(g_ck, g_full, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(xg_ck, xg_full, rtol=1e-5, atol=1e-12)


def test_guidance_one_uses_conditional_branch_only(bb):
    emb, mask = P.encode_text(bb, PROMPTS[:1])
    seen = []
    h = bb.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[0]), with_kwargs=True)
    try:
        P.sample_latents(bb, emb, mask, steps=2, guidance=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        h.remove()
    assert seen == [1, 1]


def test_tokenize_prompts_pads_to_120_and_lowercases(bb):
    ids, mask = P.tokenize_prompts(bb.tokenizer, ["  A CT Image  ", ""])
    assert ids.shape == mask.shape == (2, 120)
    ids2, _ = P.tokenize_prompts(bb.tokenizer, ["a ct image"])
    assert torch.equal(ids[0], ids2[0])
    assert mask[1].sum() == 1  # "" is just </s>


def test_decode_checkpointing_recomputes_blocks_with_equal_gradients(bb):
    from medart_core.backbone import load_backbone

    b = load_backbone("tiny")
    b.vae.requires_grad_(True)
    z = torch.randn(1, 4, b.latent_size, b.latent_size, generator=torch.Generator().manual_seed(0))
    calls = []
    h = b.vae.decoder.mid_block.register_forward_pre_hook(lambda *a: calls.append(1))

    def grads(ckpt):
        calls.clear()
        b.vae.zero_grad(set_to_none=True)
        x = z.clone().requires_grad_(True)
        P.decode(b.vae, x, checkpoint=ckpt).square().mean().backward()
        return x.grad, torch.cat([p.grad.flatten() for p in b.vae.decoder.parameters()]), len(calls)

    try:
        gx, gp, n_plain = grads(False)
        gx_ck, gp_ck, n_ck = grads(True)
    finally:
        h.remove()
    assert (n_plain, n_ck) == (1, 2)  # the mid block ran again in the backward pass
    torch.testing.assert_close(gx_ck, gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gp_ck, gp, rtol=1e-5, atol=1e-7)
    assert b.vae.decoder.gradient_checkpointing is False  # left as found
    assert "_gradient_checkpointing_func" not in b.vae.decoder.__dict__


def test_trimming_text_padding_changes_nothing_but_the_cost():
    """T5 and the DiT see only the non-padding tokens; results equal the full 120-token computation."""
    import torch

    from medart_core.backbone import load_backbone
    from medart_core.pixart import guided_denoiser, run_text_encoder, tokenize_prompts, trim_text_padding

    bb = load_backbone("tiny")
    ids, mask = tokenize_prompts(bb.tokenizer, ["a ct image of the head", "an endoscopic image of polyps, red"])
    trimmed_ids, trimmed_mask = trim_text_padding(ids, mask)
    assert trimmed_ids.shape[1] == int(mask.sum(1).max()) < 120
    with torch.no_grad():
        full = bb.text_encoder(ids, attention_mask=mask)[0]
        fast = run_text_encoder(bb.text_encoder, ids, mask)
        assert fast.shape == full.shape
        real = mask.bool()
        assert torch.allclose(fast[real], full[real], atol=1e-5)
        assert not fast[:, trimmed_ids.shape[1]:].any(), "the all-padding tail is never computed"

        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor(600)
        neg_ids, neg_mask = tokenize_prompts(bb.tokenizer, ["", ""])
        neg = bb.text_encoder(neg_ids, attention_mask=neg_mask)[0]
        eps = guided_denoiser(bb.transformer, full, mask, neg, neg_mask, guidance=4.5)(x, t)
        xin, tt = torch.cat([x, x]), t.reshape(1).expand(4)
        out = bb.transformer(xin, encoder_hidden_states=torch.cat([neg, full]),
                             encoder_attention_mask=torch.cat([neg_mask, mask]), timestep=tt,
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
        u, c = out.chunk(2)
        assert torch.allclose(eps, u + 4.5 * (c - u), atol=1e-5)
    # Nothing to trim when a row uses every position.
    same_ids, _ = trim_text_padding(ids, torch.ones_like(mask))
    assert same_ids.shape[1] == 120


def test_text_padding_trimming_can_be_switched_off():
    import torch

    from medart_core.backbone import load_backbone
    from medart_core.pixart import run_text_encoder, tokenize_prompts, trim_text_padding

    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    emb = torch.randn(2, 4, 3)
    assert trim_text_padding(emb, mask)[0].shape[1] == 2

    # The switch is an argument: with trim_padding=False T5 computes all 120 positions (the reference).
    bb = load_backbone("tiny")
    ids, tmask = tokenize_prompts(bb.tokenizer, ["a ct image of the head"])
    calls = []
    hook = bb.text_encoder.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            run_text_encoder(bb.text_encoder, ids, tmask, trim_padding=False)
            run_text_encoder(bb.text_encoder, ids, tmask, trim_padding=True)
    finally:
        hook.remove()
    assert calls[0] == 120 and calls[1] == int(tmask.sum()) < 120

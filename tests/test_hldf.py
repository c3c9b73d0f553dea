"""HLDF losses: config, colour moments by hand, latent loss, pixel loss gradients, the hybrid step."""
from __future__ import annotations

import math

import pytest
import torch

from medart_core import hldf as H
from medart_core import pixart as P
from medart_core import sampling as S
from medart_core.errors import ConfigError

PROMPTS = ["A CT image of the abdomen", "An endoscopic image of a polyp"]


def _fresh(trainable_t5: bool = True):
    from medart_core.backbone import load_backbone

    b = load_backbone("tiny")
    b.transformer.requires_grad_(True)
    b.text_encoder.requires_grad_(trainable_t5)
    return b


def _real(b, n=2, seed=3):
    return torch.rand(n, 3, b.resolution, b.resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _grads(b):
    ps = [p for m in (b.transformer, b.text_encoder) for p in m.parameters() if p.requires_grad]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in ps])


def _zero(b):
    for m in (b.transformer, b.text_encoder):
        m.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------- config


def test_config_defaults_and_json_round_trip():
    c = H.HLDFConfig()
    assert (c.pixel_every, c.sample_steps, c.guidance, c.truncated_k) == (500, 20, 4.5, 2)
    assert c.weight == pytest.approx(1 / 20)
    c2 = H.HLDFConfig(pixel_every=7, sample_steps=4, color_weight=0.3, color_variant="reference",
                      grad_path="truncated", truncated_k=1, checkpointing=False, negative_prompt="blurry")
    assert H.HLDFConfig.from_json(c2.to_json()) == c2
    assert H.HLDFConfig.from_json(c.to_json()) == c
    assert c2.weight == 0.3


@pytest.mark.parametrize("bad", [dict(pixel_every=0), dict(sample_steps=0), dict(color_variant="x"),
                                 dict(grad_path="partial"), dict(truncated_k=0), dict(color_weight=-1.0)])
def test_config_rejects_invalid(bad):
    with pytest.raises(ConfigError):
        H.HLDFConfig(**bad)


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="pixel_evry"):
        H.HLDFConfig.from_dict({"pixel_evry": 3})


def test_pixel_step_rule_counts_completed_steps():
    c = H.HLDFConfig(pixel_every=500)
    assert [s for s in range(1500) if H.is_pixel_step(s, c)] == [499, 999, 1499]
    assert all(H.is_pixel_step(s, H.HLDFConfig(pixel_every=1)) for s in range(5))


# ----------------------------------------------------------------------------------------- colour loss


def test_color_moment_loss_hand_computed():
    # 1 image, 3 channels, 2x2 pixels.
    fake = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]],     # mu 0.5, sigma 0.5
                          [[0.2, 0.2], [0.2, 0.2]],     # mu 0.2, sigma 0
                          [[-1.0, 1.0], [-1.0, 1.0]]]])  # mu 0,   sigma 1
    real = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]],     # mu 1,   sigma 0
                          [[0.0, 0.4], [0.0, 0.4]],     # mu 0.2, sigma 0.2
                          [[0.5, 0.5], [0.5, 0.5]]]])   # mu 0.5, sigma 0
    # channel gaps: (0.25 + 0.25), (0 + 0.04), (0.25 + 1)
    paper = 0.5 + 0.04 + 1.25
    assert H.color_moment_loss(fake, real, "paper").item() == pytest.approx(paper, abs=1e-5)
    assert H.color_moment_loss(fake, real, "reference").item() == pytest.approx(paper / 3, abs=1e-5)
    assert H.color_moment_loss(real, real).item() == pytest.approx(0.0, abs=1e-10)


def test_color_moment_loss_is_batch_mean_and_size_independent():
    g = torch.Generator().manual_seed(0)
    f, r = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    both = H.color_moment_loss(f, r)
    each = [H.color_moment_loss(f[i:i + 1], r[i:i + 1]) for i in range(2)]
    assert both.item() == pytest.approx((each[0].item() + each[1].item()) / 2, rel=1e-6)
    # moments only: a nearest-neighbour 2x upsampling has the same colour statistics
    up = r.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert H.color_moment_loss(f, up).item() == pytest.approx(both.item(), rel=1e-5)
    with pytest.raises(ConfigError):
        H.color_moment_loss(f[:1], r)


def test_color_loss_gradient_finite_on_flat_image():
    fake = torch.zeros(1, 3, 4, 4, requires_grad=True)
    H.color_moment_loss(fake, torch.rand(1, 3, 4, 4)).backward()
    assert torch.isfinite(fake.grad).all()


# ----------------------------------------------------------------------------------------- latent loss


def test_latent_loss_matches_ddpm_add_noise():
    from diffusers import DDPMScheduler

    b = _fresh(trainable_t5=False)
    emb, mask = P.encode_text(b, PROMPTS)
    lat = torch.randn(2, 4, b.latent_size, b.latent_size, generator=torch.Generator().manual_seed(1))
    loss = H.latent_loss(b.transformer, lat, emb, mask, generator=torch.Generator().manual_seed(5),
                         scheduler_config=b.scheduler.config)
    # the same draws, by hand, with diffusers' DDPM forward process
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(lat.shape, generator=g)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    noisy = ddpm.add_noise(lat, noise, t)
    pred = b.transformer(noisy, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
    want = torch.nn.functional.mse_loss(pred, noise)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.transformer.parameters())
    again = H.latent_loss(b.transformer, lat, emb, mask, generator=torch.Generator().manual_seed(5))
    assert again.item() == loss.item()


def test_encode_prompts_builds_graph_only_when_t5_trainable():
    b = _fresh(trainable_t5=False)
    ids, mask = P.tokenize_prompts(b.tokenizer, PROMPTS)
    emb, _ = P.encode_prompts(b, ids, mask)
    assert not emb.requires_grad
    b.text_encoder.requires_grad_(True)
    emb, _ = P.encode_prompts(b, ids, mask)
    assert emb.requires_grad


# ------------------------------------------------------------------------------------------ pixel loss


def _pixel_grads(b, cfg, ids, mask, real, noise):
    _zero(b)
    emb, m = P.encode_prompts(b, ids, mask)
    loss = H.pixel_loss(b, emb, m, real, cfg, generator=None, noise=noise)
    loss.backward()
    return loss.detach(), _grads(b)


def test_checkpointed_gradients_equal_plain_autograd():
    """Full path through all M steps, the VAE decoder and T5: checkpointing changes memory, not gradients."""
    b = _fresh()
    ids, mask = P.tokenize_prompts(b.tokenizer, PROMPTS)
    real = _real(b)
    noise = torch.randn(2, 4, b.latent_size, b.latent_size, generator=torch.Generator().manual_seed(0))
    l_plain, g_plain = _pixel_grads(b, H.HLDFConfig(sample_steps=3, checkpointing=False), ids, mask, real, noise)
    l_ck, g_ck = _pixel_grads(b, H.HLDFConfig(sample_steps=3, checkpointing=True), ids, mask, real, noise)
    assert l_plain.item() == pytest.approx(l_ck.item(), rel=1e-6)
    assert g_plain.abs().max() > 0
    n_t5 = sum(p.numel() for p in b.text_encoder.parameters())
    assert g_plain[-n_t5:].abs().max() > 0  # gradients reach T5 (through the prompt and the negative prompt)
    assert ((g_ck - g_plain).abs().max() / g_plain.abs().max()).item() < 1e-5


def test_truncated_path_k_equals_m_is_full_and_k_less_is_not():
    b = _fresh()
    ids, mask = P.tokenize_prompts(b.tokenizer, PROMPTS[:1])
    real = _real(b, 1)
    noise = torch.randn(1, 4, b.latent_size, b.latent_size, generator=torch.Generator().manual_seed(2))
    _, g_full = _pixel_grads(b, H.HLDFConfig(sample_steps=4), ids, mask, real, noise)
    _, g_km = _pixel_grads(b, H.HLDFConfig(sample_steps=4, grad_path="truncated", truncated_k=4), ids, mask, real,
                           noise)
    _, g_k1 = _pixel_grads(b, H.HLDFConfig(sample_steps=4, grad_path="truncated", truncated_k=1), ids, mask, real,
                           noise)
    assert ((g_km - g_full).abs().max() / g_full.abs().max()).item() < 1e-6
    assert ((g_k1 - g_full).abs().max() / g_full.abs().max()).item() > 1e-3


def test_pixel_loss_batch_of_two_is_mean_of_two_single_losses():
    b = _fresh(trainable_t5=False)
    cfg = H.HLDFConfig(sample_steps=3, checkpointing=False)
    ids, mask = P.tokenize_prompts(b.tokenizer, PROMPTS)
    emb, m = P.encode_prompts(b, ids, mask)
    real = _real(b)
    noise = torch.randn(2, 4, b.latent_size, b.latent_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        both = H.pixel_loss(b, emb, m, real, cfg, generator=None, noise=noise)
        singles = [H.pixel_loss(b, emb[i:i + 1], m[i:i + 1], real[i:i + 1], cfg, generator=None,
                                noise=noise[i:i + 1]) for i in range(2)]
    assert not math.isclose(singles[0].item(), singles[1].item())  # different prompts/images: not a tautology
    assert both.item() == pytest.approx((singles[0].item() + singles[1].item()) / 2, rel=1e-5)
    with pytest.raises(ConfigError):
        H.pixel_loss(b, emb, m, real[:1], cfg, generator=None)


def test_pixel_loss_generates_what_the_sampler_generates():
    """The loss's image is the sampler's image (same noise): no hidden second code path."""
    b = _fresh(trainable_t5=False)
    cfg = H.HLDFConfig(sample_steps=3)
    emb, m = P.encode_text(b, PROMPTS[:1])
    noise = torch.randn(1, 4, b.latent_size, b.latent_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        img = H.generate_for_loss(b, emb, m, cfg, generator=None, noise=noise)
        lat = P.sample_latents(b, emb, m, steps=3, guidance=4.5, latents=noise)
        ref = P.decode(b.vae, lat)
    torch.testing.assert_close(img, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- hybrid step


def test_hybrid_loss_adds_weighted_colour_term_on_pixel_steps():
    b = _fresh(trainable_t5=True)
    ids, mask = P.tokenize_prompts(b.tokenizer, PROMPTS)
    real = _real(b)
    batch = {"pixel_values": real, "input_ids": ids, "attention_mask": mask}
    cfg = H.HLDFConfig(pixel_every=2, sample_steps=3)

    _, logs0 = H.hybrid_loss(0, b, batch, cfg, generator=torch.Generator().manual_seed(0))
    assert "loss_color" not in logs0 and logs0["loss"] == pytest.approx(logs0["loss_latent"])

    loss1, logs1 = H.hybrid_loss(1, b, batch, cfg, generator=torch.Generator().manual_seed(0))
    assert logs1["loss_color"] > 0 and logs1["color_weight"] == pytest.approx(1 / 3)
    assert logs1["loss"] == pytest.approx(logs1["loss_latent"] + logs1["loss_color"] / 3, rel=1e-6)
    assert logs1["loss_latent"] == pytest.approx(logs0["loss_latent"], rel=1e-6)  # same draws, same order
    loss1.backward()
    assert _grads(b).abs().max() > 0

    # cached latents + embeddings give the same latent loss as encoding in the step
    with torch.no_grad():
        emb, m = P.encode_prompts(b, ids, mask)
    cached = {"latents": torch.randn(2, 4, b.latent_size, b.latent_size), "prompt_embeds": emb, "prompt_mask": m}
    _, logs_c = H.hybrid_loss(0, b, cached, cfg, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(logs_c["loss_latent"])
    with pytest.raises(ConfigError, match="pixel_values"):
        H.hybrid_loss(1, b, cached, cfg, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError):
        H.hybrid_loss(0, b, {"pixel_values": real}, cfg, generator=None)

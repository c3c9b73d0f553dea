"""LoRA attach / state dicts / PEFT adapter folders / merged export, with stock peft and diffusers loaders."""
from __future__ import annotations

import json

import pytest
import torch

from medart_core import lora as L
from medart_core import pixart as P
from medart_core import sampling as S
from medart_core.errors import ConfigError

PROMPT = "A CT image of the abdomen"


def _bb(dtype=None):
    from medart_core.backbone import load_backbone

    return load_backbone("tiny", torch_dtype=dtype)


def _randomise_lora(b, seed=0):
    """LoRA starts as the identity (B = 0); give it weights so that comparisons can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in L.trainable_parameters(b):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _dit_out(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    e = torch.randn(1, 120, transformer.config.caption_channels, generator=g)
    m = torch.ones(1, 120, dtype=torch.long)
    with torch.no_grad():
        return transformer(x, encoder_hidden_states=e, encoder_attention_mask=m, timestep=torch.tensor([500]),
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def _t5_out(b, te=None):
    ids, mask = P.tokenize_prompts(b.tokenizer, [PROMPT])
    with torch.no_grad():
        return (te or b.text_encoder)(input_ids=ids, attention_mask=mask)[0]


def test_config_json_round_trip_and_validation():
    c = L.LoRAConfig()
    assert c.rank == 8 and c.alpha == 8 and c.t5_enabled and not c.use_dora
    assert c.dit_targets == list(L.PAPER_DIT_TARGETS) and c.t5_targets == ["q", "k", "v", "o", "wi", "wo"]
    c2 = L.LoRAConfig(rank=4, alpha=2, t5_enabled=False, dit_targets=["to_q"])
    assert L.LoRAConfig.from_json(c2.to_json()) == c2
    with pytest.raises(ConfigError):
        L.LoRAConfig(rank=0)
    with pytest.raises(ConfigError):
        L.LoRAConfig.from_dict({"rnak": 8})


def test_attach_targets_rank_and_only_lora_trainable():
    b = L.attach_lora(_bb())
    rep = b.extra["lora_report"]
    assert rep.dit["proj_in"] == []  # PixArt-α has no proj_in: reported, not an error
    assert rep.dit["to_out.0"] == ["to_out.0"] and rep.dit["linear_1"] == ["linear_1"]
    assert rep.t5["wi"] == ["wi_0", "wi_1"]  # T5 v1.1 gated FFN
    assert "wi->wi_0/wi_1" in rep.summary()
    lora_a = {n: p for n, p in b.transformer.named_parameters() if "lora_A" in n}
    assert lora_a and all(p.shape[0] == 8 for p in lora_a.values())
    wrapped = {n.split(".lora_A")[0].rsplit(".", 0)[0] for n in lora_a}
    assert any(n.endswith("attn2.to_k") for n in wrapped) and any(n.endswith("pos_embed.proj") for n in wrapped)
    assert any(n.endswith("caption_projection.linear_2") for n in wrapped)
    t5_lora = [n for n, _ in b.text_encoder.named_parameters() if "lora_A" in n]
    assert any(".wi_1." in n for n in t5_lora) and any("SelfAttention.o." in n for n in t5_lora)
    trainable = [n for m in (b.transformer, b.text_encoder, b.vae) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert rep.n_trainable == sum(p.numel() for p in L.trainable_parameters(b))
    assert _dit_out(b.transformer).abs().max() > 0
    with pytest.raises(ConfigError, match="already"):
        L.attach_lora(b)


def test_attach_without_t5_and_bad_targets():
    b = L.attach_lora(_bb(), L.LoRAConfig(t5_enabled=False))
    assert not any(p.requires_grad for p in b.text_encoder.parameters())
    assert set(L.lora_state_dict(b)) == {"dit"}
    with pytest.raises(ConfigError, match="None of the DiT"):
        L.attach_lora(_bb(), L.LoRAConfig(dit_targets=["no_such_layer"]))
    with pytest.raises(ConfigError, match="T5"):
        L.attach_lora(_bb(), L.LoRAConfig(t5_targets=["nope"]))


def test_lora_params_fp32_on_bf16_backbone():
    b = L.attach_lora(_bb(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in L.trainable_parameters(b))
    assert b.transformer.pos_embed.proj.base_layer.weight.dtype == torch.bfloat16
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    e = torch.randn(1, 120, b.transformer.config.caption_channels, dtype=torch.bfloat16)
    y = b.transformer(x, encoder_hidden_states=e, encoder_attention_mask=torch.ones(1, 120, dtype=torch.long),
                      timestep=torch.tensor([10]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    y.float().mean().backward()
    dit_lora = [p for p in b.transformer.parameters() if p.requires_grad]
    assert dit_lora and all(p.grad is not None and p.grad.dtype == torch.float32 for p in dit_lora)


def test_state_dict_round_trip_and_mismatch():
    a = L.attach_lora(_bb())
    _randomise_lora(a)
    sd = L.lora_state_dict(a)
    assert set(sd) == {"dit", "t5"} and all(v.device.type == "cpu" for v in sd["dit"].values())
    b = L.attach_lora(_bb())
    assert not torch.allclose(_dit_out(a.transformer), _dit_out(b.transformer))
    L.load_lora_state_dict(b, sd)
    torch.testing.assert_close(_dit_out(b.transformer), _dit_out(a.transformer), rtol=0, atol=0)
    torch.testing.assert_close(_t5_out(b), _t5_out(a), rtol=0, atol=0)
    with pytest.raises(ConfigError):
        L.load_lora_state_dict(b, {"dit": sd["dit"]})
    bad = {"dit": dict(list(sd["dit"].items())[1:]), "t5": sd["t5"]}
    with pytest.raises(ConfigError, match="missing"):
        L.load_lora_state_dict(b, bad)
    with pytest.raises(ConfigError, match="attach_lora"):
        L.lora_state_dict(_bb())


def test_save_adapters_load_with_stock_peft(tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    a = L.attach_lora(_bb())
    _randomise_lora(a, seed=1)
    out = L.save_adapters(a, tmp_path / "adapters")
    for sub in ("transformer", "text_encoder"):
        cfg = json.loads((out / sub / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8
        with safe_open(str(out / sub / "adapter_model.safetensors"), "pt") as f:
            assert all(k.startswith("base_model.model.") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".pth"}]

    fresh = _bb()
    t5 = PeftModel.from_pretrained(fresh.text_encoder, str(out / "text_encoder"))
    torch.testing.assert_close(_t5_out(fresh, t5), _t5_out(a), rtol=0, atol=1e-6)
    dit = PeftModel.from_pretrained(fresh.transformer, str(out / "transformer"))
    torch.testing.assert_close(_dit_out(dit), _dit_out(a.transformer), rtol=0, atol=1e-6)

    again = L.load_adapters(_bb(), out)
    torch.testing.assert_close(_dit_out(again.transformer), _dit_out(a.transformer), rtol=0, atol=0)


def test_export_merged_loads_in_stock_pipeline_and_matches_lora(tmp_path):
    from diffusers import PixArtAlphaPipeline

    a = L.attach_lora(_bb())
    _randomise_lora(a, seed=2)
    folder = L.export_merged(a, tmp_path / "merged", card="# a card\n")
    assert (folder / "model_index.json").is_file() and (folder / "README.md").is_file()
    assert not [p for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".pth"}]
    pipe = PixArtAlphaPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in pipe.transformer.state_dict())
    assert not any("lora" in k for k in pipe.text_encoder.state_dict())
    live = a.pipeline()
    live.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=4.5, height=64, width=64, use_resolution_binning=False,
              output_type="pt", clean_caption=False)
    merged_img = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    lora_img = live(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    base_img = _bb().pipeline()(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert (merged_img - lora_img).abs().max() < 1e-4
    assert (base_img - lora_img).abs().max() > 1e-3  # the LoRA really changes the image
    # the live backbone keeps its adapters (export works on copies)
    assert any("lora_" in n for n, _ in a.transformer.named_parameters())

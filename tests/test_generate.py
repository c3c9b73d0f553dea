"""Generation from any checkpoint: base resident, adapters swapped in place, seeded batches, PNG + sidecar,
byte-exact regeneration, equality with the stock pipeline on a merged export, the T5-LoRA embedding cache."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image
from training_data import make_dataset

from medart_core.constants import RANDOM_LABEL
from medart_core.errors import ConfigError, MissingWeightsError, NotFoundError

PROMPTS = ["An endoscopic image of polyps", "An endoscopic image of esophagitis"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A workspace with two real training runs of the tiny backbone: ``r1`` (cpu-smoke: LoRA on DiT and
    T5, checkpoints at steps 2 and 4) and ``dit`` (another LoRA shape: rank 2, DiT only)."""
    from medart_core.captions import CaptionStore
    from medart_core.train import TrainConfig, train
    from medart_core.workspace import Workspace

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    ws = Workspace.open(tmp_path_factory.mktemp("gen") / "ws")
    store = CaptionStore.for_workspace(ws)
    make_dataset(ws, store, "mini", n=4)
    common = dict(dataset="mini", captions="latest", val_images=0, export_merged=False, batch_size=1,
                  lr=1e-2)  # a large lr so two steps move the adapters visibly
    train(TrainConfig.from_preset("cpu-smoke", max_steps=4, checkpoint_every=2, **common), ws, store, run_name="r1")
    train(TrainConfig.from_preset("cpu-smoke", max_steps=2, checkpoint_every=2,
                                  lora={"rank": 2, "alpha": 2.0, "t5_enabled": False}, **common),
          ws, store, run_name="dit")
    store.close()
    torch.set_num_threads(n)
    return ws


@pytest.fixture(scope="module")
def gen(env):
    from medart_core.generate import Generator

    return Generator(env, "tiny")


def _req(**kw):
    from medart_core.generate import GenerationRequest

    d = dict(prompts=PROMPTS[:1], steps=3, seed=11, n=1)
    d.update(kw)
    return GenerationRequest(**d)


def test_checkpoint_refs_listed(env):
    from medart_core.generate import list_checkpoint_refs, parse_checkpoint_ref

    assert list_checkpoint_refs(env) == ["base", "dit@2", "r1@2", "r1@4"]
    assert parse_checkpoint_ref("base") == (None, None)
    assert parse_checkpoint_ref("r1") == ("r1", None)
    assert parse_checkpoint_ref("r1@4") == ("r1", 4)
    with pytest.raises(ConfigError):
        parse_checkpoint_ref("r1@last")


def test_png_and_sidecar_record_everything(gen):
    imgs = gen.generate(_req(prompts=PROMPTS, n=2, seed=7, batch_size=3))
    assert [(i.prompt, i.seed, i.index) for i in imgs] == [
        (PROMPTS[0], 7, 0), (PROMPTS[0], 8, 1), (PROMPTS[1], 7, 0), (PROMPTS[1], 8, 1)]
    assert len({i.path.parent for i in imgs}) == 1 and imgs[0].path.parent.parent == gen.ws.samples_dir
    for img in imgs:
        data = img.path.read_bytes()
        im = Image.open(img.path)
        assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
        assert im.text["medart:label"] == RANDOM_LABEL                 # the file itself carries the label
        s = json.loads(img.sidecar.read_text())
        import hashlib

        assert s["png_sha256"] == hashlib.sha256(data).hexdigest() == img.sha256
        assert (s["prompt"], s["negative"], s["seed"], s["checkpoint"], s["adapters_sha256"]) == (
            img.prompt, "", img.seed, "base", "base")
        assert (s["backbone"], s["resolution"], s["steps"], s["guidance"], s["strength"]) == ("tiny", 64, 3, 4.5, 1.0)
        assert s["is_random"] is True and s["label"] == RANDOM_LABEL and s["backbone_label"].endswith(
            f"({RANDOM_LABEL})")
        assert "DPM-Solver++(2M)" in s["sampler"] and s["seed_rule"].startswith("image k")
        assert {"torch", "diffusers", "peft"} <= set(s["versions"])
        assert s["seed_was_random"] is False and s["request_seed"] == 7
        assert RANDOM_LABEL in img.caption
    # chunks of 3: the 4th image was sampled alone, and the sidecar says so
    assert json.loads(imgs[3].sidecar.read_text())["batch"] == {"prompts": [PROMPTS[1]], "seeds": [8], "position": 0}
    # same prompt + seed in two positions gives (numerically) the same image
    a, b = (torch.tensor(list(Image.open(imgs[k].path).getdata()), dtype=torch.float32) for k in (0, 2))
    assert not torch.equal(a, b), "different prompts, same seed: different images"


def test_random_seed_is_recorded_and_reused(gen):
    from medart_core.generate import load_settings

    img = gen.generate(_req(seed=None, checkpoint="r1@2"))[0]
    s = json.loads(img.sidecar.read_text())
    assert s["seed_was_random"] is True and s["seed"] == s["request_seed"] == img.seed
    req = load_settings(img.sidecar)
    assert (req.prompts, req.seed, req.checkpoint, req.steps, req.resolution, req.n) == (
        [img.prompt], img.seed, "r1@2", 3, 64, 1)
    again = gen.generate(req)[0]   # a one-image request reused: the same chunk, so the same bytes
    assert again.path.read_bytes() == img.path.read_bytes()


def test_regenerate_is_byte_equal_after_switching_checkpoints(gen, env):
    from medart_core import generate as G

    imgs = gen.generate(_req(prompts=PROMPTS, n=3, seed=3, checkpoint="r1@2", batch_size=4))
    base = gen.generate(_req(seed=5))[0]
    for ref in ("dit@2", "r1@4", "base", "r1@2", "dit"):   # swap back and forth: no drift in the weights
        gen.use(ref)
    for img in (imgs[1], imgs[5], base):                  # first chunk, second chunk, base
        again = gen.regenerate(img.sidecar)
        assert again.path.read_bytes() == img.path.read_bytes()
        assert again.settings["matches_original"] is True and again.path != img.path
    # the module-level face (a shared generator per workspace and backbone) does the same
    assert G.regenerate(imgs[4].sidecar, ws=env).path.read_bytes() == imgs[4].path.read_bytes()


def test_switching_never_reloads_the_base_and_base_is_exact(gen):
    from medart_core.backbone import load_backbone

    tr = gen.backbone.transformer
    for ref in ("r1@2", "r1@4", "dit@2", "r1", "base", "dit@2"):
        gen.use(ref)
    assert gen.stats["backbone_loads"] == 1 and gen.backbone.transformer is tr
    assert gen.stats["lora_injections"] == 2                     # one per LoRA shape, not per checkpoint
    gen.use("base")
    fresh = load_backbone("tiny")
    ours = {k.replace(".base_layer", ""): v for k, v in tr.state_dict().items() if "lora_" not in k}
    for k, v in fresh.transformer.state_dict().items():
        assert torch.equal(ours[k], v), k
    x = gen.sample(PROMPTS, [1, 2], steps=2)
    from medart_core import pixart as P

    emb, mask = P.encode_text(fresh, PROMPTS)
    neg, nmask = P.encode_text(fresh, ["", ""])
    noise = torch.cat([P.initial_noise((1, 4, 8, 8), torch.Generator().manual_seed(s)) for s in (1, 2)])
    with torch.no_grad():
        ref = P.decode(fresh.vae, P.sample_latents(fresh, emb, mask, neg, nmask, steps=2, latents=noise))
    assert (x - ref).abs().max().item() <= 1e-5


def test_checkpoint_images_equal_stock_pipeline_on_merged_export(gen, env, tmp_path):
    """r1@4 swapped in place vs ``PixArtAlphaPipeline.from_pretrained`` of its merged export: same images."""
    from diffusers import PixArtAlphaPipeline
    from safetensors.torch import load_file

    from medart_core.backbone import load_backbone
    from medart_core.checkpoint import find_checkpoint, load_adapter_tensors
    from medart_core.lora import LoRAConfig, attach_lora, export_merged

    ck = find_checkpoint(env, "r1", 4)
    state = json.loads((ck / "state.json").read_text())
    bb = load_backbone("tiny")
    attach_lora(bb, LoRAConfig.from_dict(state["config"]["lora"]))
    load_adapter_tensors(bb, load_file(str(ck / "adapters.safetensors")))
    pipe = PixArtAlphaPipeline.from_pretrained(str(export_merged(bb, tmp_path / "merged")))
    pipe.set_progress_bar_config(disable=True)
    seeds = [4, 9]
    ref = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=5,
               guidance_scale=4.5, height=64, width=64, use_resolution_binning=False, clean_caption=False,
               output_type="pt").images
    gen.use("r1@4")
    ours = (gen.sample(PROMPTS, seeds, steps=5) / 2 + 0.5).clamp(0, 1)
    assert (ours - ref).abs().max().item() <= 1e-4
    gen.use("base")
    base = (gen.sample(PROMPTS, seeds, steps=5) / 2 + 0.5).clamp(0, 1)
    assert (base - ref).abs().max().item() > 1e-3, "the checkpoint must change the images, or this says nothing"


def test_strength_scales_the_adapters(gen):
    seeds = [2]
    gen.use("base")
    base = gen.sample(PROMPTS[:1], seeds, steps=3)
    gen.use("r1@4", strength=0.0)
    zero = gen.sample(PROMPTS[:1], seeds, steps=3)
    gen.use("r1@4", strength=1.0)
    full = gen.sample(PROMPTS[:1], seeds, steps=3)
    gen.use("r1@4", strength=0.5)
    half = gen.sample(PROMPTS[:1], seeds, steps=3)
    assert (zero - base).abs().max().item() <= 1e-5
    d_full, d_half = (full - base).abs().max().item(), (half - base).abs().max().item()
    assert d_full > 1e-3 and 0 < d_half < d_full
    img = gen.generate(_req(checkpoint="r1@4", strength=0.5))[0]
    assert img.settings["strength"] == 0.5


def test_t5_lora_checkpoints_never_get_base_embeddings_from_the_cache(gen, env):
    from safetensors.torch import load_file

    from medart_core import pixart as P
    from medart_core.backbone import load_backbone
    from medart_core.checkpoint import find_checkpoint, load_adapter_tensors
    from medart_core.lora import LoRAConfig, attach_lora

    prompt = "An endoscopic image of a polyp with red mucosa"
    gen.use("base")
    e_base = gen.prompt_embedding(prompt)
    gen.use("r1@4")                                  # LoRA on T5: a different embedding
    hits = gen.stats["embed_hits"]
    e_r1 = gen.prompt_embedding(prompt)
    assert gen.stats["embed_hits"] == hits and not torch.allclose(e_r1, e_base)
    ck = find_checkpoint(env, "r1", 4)
    ref_bb = load_backbone("tiny")
    attach_lora(ref_bb, LoRAConfig.from_dict(json.loads((ck / "state.json").read_text())["config"]["lora"]))
    load_adapter_tensors(ref_bb, load_file(str(ck / "adapters.safetensors")))
    ref, mask = P.encode_text(ref_bb, [prompt])
    assert torch.allclose(e_r1, ref[0, : int(mask.sum())], atol=1e-6)
    assert gen.prompt_embedding(prompt) is e_r1 and gen.stats["embed_hits"] == hits + 1
    gen.use("r1@4", strength=0.5)                    # strength changes T5 too: another entry
    assert not torch.allclose(gen.prompt_embedding(prompt), e_r1)
    gen.use("dit@2")                                 # DiT-only LoRA: the base T5 embedding, from the cache
    hits = gen.stats["embed_hits"]
    assert gen.prompt_embedding(prompt) is e_base and gen.stats["embed_hits"] == hits + 1


def test_unknown_run_or_step_lists_what_exists(gen):
    with pytest.raises(NotFoundError, match=r"dit@2, r1@2, r1@4"):
        gen.generate(_req(checkpoint="nope"))
    with pytest.raises(NotFoundError, match=r"available steps: \[2, 4\]"):
        gen.generate(_req(checkpoint="r1@99"))


def test_overlong_prompt_is_truncated_with_a_warning(gen):
    long = "An endoscopic image of polyps " + " ".join(f"feature{i} reddish mucosa" for i in range(80))
    img = gen.generate(_req(prompts=[long, PROMPTS[0]]))
    assert len(img[0].warnings) == 1 and "truncated" in img[0].warnings[0] and "120" in img[0].warnings[0]
    assert "tiny Unigram tokenizer" in img[0].warnings[0] and img[1].warnings == []
    assert json.loads(img[0].sidecar.read_text())["warnings"] == img[0].warnings


def test_missing_weights_and_mismatched_backbone(env, tmp_path):
    from medart_core.generate import Generator

    with pytest.raises(MissingWeightsError, match="diffusers pipeline folder|neither"):
        Generator(env, str(tmp_path / "no-such-model")).generate(_req())
    small = Generator(env, "small")
    with pytest.raises(ConfigError, match="trained on backbone 'tiny'.*--backbone tiny"):
        small.use("r1@2")
    assert small.stats["backbone_loads"] == 0, "the mismatch is found before any model is loaded"


def test_request_validation():
    for bad in (dict(steps=0), dict(n=0), dict(guidance=float("nan")), dict(resolution=40), dict(strength=-1),
                dict(prompts=[]), dict(checkpoint="a/b"), dict(seed=-1)):
        with pytest.raises(ConfigError):
            _req(**bad)
    assert _req(prompts="one prompt").prompts == ["one prompt"]


def test_cli_generate_and_regenerate(env, capsys):
    from medart_core.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate", "-w", str(env.root), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                              "--checkpoint", "r1", "--steps", "2", "--seed", "3", "--n", "1", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [o["seed"] for o in out] == [3, 3] and out[0]["checkpoint"] == "r1@4"
    assert out[0]["label"] == RANDOM_LABEL
    args = parser.parse_args(["regenerate", out[1]["sidecar"], "-w", str(env.root), "--json"])
    assert args.func(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert again["sha256"] == out[1]["sha256"] and again["matches_original"] is True


def test_text_work_is_done_once_per_call_with_the_same_bits(gen, monkeypatch):
    import medart_core.generate as G

    gen.use("base")
    with_memo = gen.sample(PROMPTS, [1, 2], steps=4)
    monkeypatch.setattr(G, "text_work_once", lambda transformer: __import__("contextlib").nullcontext())
    without = gen.sample(PROMPTS, [1, 2], steps=4)
    monkeypatch.undo()
    assert torch.equal(with_memo, without)
    to_k = gen.backbone.transformer.transformer_blocks[0].attn2.to_k
    calls = []
    real = type(to_k).forward
    monkeypatch.setattr(type(to_k), "forward", lambda self, x: calls.append(self) or real(self, x))
    gen.sample(PROMPTS, [1, 2], steps=4)
    assert calls.count(to_k) == 1, "cross-attention keys of the text computed once, not once per step"
    assert "forward" not in to_k.__dict__, "nothing is left patched after the call"


def test_regenerate_refuses_when_the_checkpoint_changed(gen, env):
    import shutil

    from safetensors.torch import load_file, save_file

    src = env.run_dir("r1")
    dst = env.run_dir("r1copy")
    shutil.copytree(src, dst)
    img = gen.generate(_req(checkpoint="r1copy@4"))[0]
    path = dst / "checkpoints" / "step_000004" / "adapters.safetensors"
    t = load_file(str(path))
    k = next(iter(t))
    t[k] = t[k] + 1.0                                      # same size: the checkpoint still reads as complete
    save_file(t, str(path), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="changed since this image was made"):
        gen.regenerate(img.sidecar)
    shutil.rmtree(dst)


def test_generate_job_kind_reports_progress_and_stops(gen, env):
    from medart_core.generate import prepare_generate_job, run_generate_job

    config, run = prepare_generate_job(env, {"request": {"prompts": PROMPTS, "steps": 2, "seed": 1, "n": 2,
                                                         "batch_size": 2, "checkpoint": "r1@2"}})
    assert run is None and config["request"]["n"] == 2
    with pytest.raises(NotFoundError):
        prepare_generate_job(env, {"request": {"checkpoint": "nope"}})
    with pytest.raises(ConfigError):
        prepare_generate_job(env, {"request": {}, "extra": 1})

    class Ctx:
        def __init__(self, cfg):
            self.ws, self.config, self.progressed, self.stop = env, cfg, [], False

        def progress(self, step=None, total=None, **info):
            self.progressed.append((step, total))

        def should_stop(self):
            return self.stop

    ctx = Ctx(config)
    out = run_generate_job(ctx)
    assert out["status"] == "finished" and len(out["images"]) == 4 and ctx.progressed[-1] == (4, 4)
    ctx = Ctx(config)
    ctx.stop = True
    assert run_generate_job(ctx) == {"status": "stopped"}

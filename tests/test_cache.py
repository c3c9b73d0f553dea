"""Feature cache: hits, staleness (caption version, damaged shard) detected and repaired before step 0,
cached features equal to a direct computation."""
from __future__ import annotations

import pytest
from training_data import make_dataset, tiny_train_config

from medart_core.errors import ConfigError, StaleCacheError

pytestmark = pytest.mark.usefixtures("one_thread")


def cached_config(**over):
    """The tiny run with the feature cache on (T5 frozen: the cache refuses a T5 with LoRA)."""
    return tiny_train_config(**{"lora": {"rank": 2, "alpha": 2.0, "t5_enabled": False},
                                "hldf": {"pixel_every": 2, "sample_steps": 2, "checkpointing": False},
                                "max_steps": 2, "cache_features": True, **over})


def _items(ws, store, cfg):
    from medart_core.cache import cache_item
    from medart_core.examples import collect_examples

    pool, _ = collect_examples(ws, store, cfg)
    return [cache_item(e) for e in pool]


def test_cache_hits_rebuilds_stale_and_damaged_entries(ws, store):
    import torch

    from medart_core.backbone import load_backbone
    from medart_core.cache import FeatureCache
    from medart_core.pixart import encode_prompts
    from medart_core.pixart import tokenize_prompts
    from medart_core.examples import load_pixels

    ids = make_dataset(ws, store, n=5)
    cfg = cached_config()
    bb = load_backbone("tiny")
    cache = FeatureCache(ws, backbone_spec="tiny", resolution=32, dtype="fp32")
    items = _items(ws, store, cfg)
    r1 = cache.ensure(bb, items)
    assert (r1.entries_needed, r1.hits, r1.built) == (5, 0, 5)
    r2 = cache.ensure(bb, items)
    assert (r2.hits, r2.built) == (5, 0)

    # Cached features are what the models compute (center crop, PixArt tokenisation).
    it = items[0]
    got = cache.load(it)
    ids_, mask = tokenize_prompts(bb.tokenizer, [it.text], max_length=120)
    with torch.no_grad():
        emb, _ = encode_prompts(bb, ids_, mask)
        dist = bb.vae.encode(load_pixels(it.image_path, 32, crop="center")[None]).latent_dist
    assert torch.allclose(got["prompt_embeds"], emb[0], atol=1e-6)
    assert torch.equal(got["prompt_mask"], mask[0])
    assert torch.allclose(got["latent_mean"], dist.mean[0], atol=1e-6)
    assert torch.allclose(got["latent_std"], dist.std[0], atol=1e-6)

    # A new caption version makes exactly that entry stale: refused without build, rebuilt with it.
    store.edit(ids[2], "An edited caption", reviewer="r", expected_version=store.current(ids[2]).version)
    items = _items(ws, store, cfg)
    with pytest.raises(StaleCacheError, match="lacks 1 of 5"):
        FeatureCache(ws, backbone_spec="tiny", resolution=32, dtype="fp32").ensure(None, items, build=False)
    r3 = cache.ensure(bb, items)
    assert (r3.hits, r3.built) == (4, 1)

    # A truncated shard is detected; its entries are recomputed.
    shard = sorted(cache.dir.glob("shard-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    r4 = cache.ensure(bb, items)
    # shard 0 held the 4 still-current entries (+ the stale one); the rebuilt entry lives in shard 1
    assert r4.dropped_shards == [shard.name] and (r4.built, r4.hits) == (4, 1)
    assert cache.ensure(bb, items).hits == 5

    # Other resolution / dtype / backbone: a different cache (never mixed up).
    assert FeatureCache(ws, backbone_spec="tiny", resolution=64, dtype="fp32").dir != cache.dir
    assert FeatureCache(ws, backbone_spec="tiny", resolution=32, dtype="bf16").dir != cache.dir
    assert FeatureCache(ws, backbone_spec="small", resolution=32, dtype="fp32").dir != cache.dir


def test_training_with_cache_rebuilds_stale_entries_before_step_zero(ws, store):
    from medart_core.train import train

    ids = make_dataset(ws, store, n=5)
    res = train(cached_config(), ws, store, run_name="c1")
    assert res.cache["built"] == 5 and res.status == "finished"

    store.edit(ids[1], "A changed caption", reviewer="r", expected_version=store.current(ids[1]).version)
    events: list[str] = []

    class Order:
        def on_step(self, m):
            events.append(f"step {m['step']}")

    res2 = train(cached_config(), ws, store, run_name="c2", callbacks=Order(), log=events.append)
    assert (res2.cache["hits"], res2.cache["built"]) == (4, 1)
    built_at = next(i for i, e in enumerate(events) if e.startswith("feature cache: 1/1"))
    assert built_at < events.index("step 1")       # repaired before the first optimiser step
    prov = __import__("json").loads((res2.last_checkpoint / "state.json").read_text())["provenance"]
    assert prov["crop"].startswith("center") and prov["feature_cache"]["built"] == 1


def test_cache_refused_when_t5_trains(ws, store):
    from medart_core.train import train

    make_dataset(ws, store, n=4)
    cfg = cached_config(lora={"rank": 2, "t5_enabled": True})
    with pytest.raises(ConfigError, match="frozen T5"):
        train(cfg, ws, store, run_name="bad")

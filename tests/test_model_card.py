"""The Hugging Face model card of ``export-model`` (issue 19 §4): its YAML front matter parses with the Hub's
own reader and has the keys the Hub reads, no file name or caption of the dataset appears in it, stored
evaluation figures of exactly the exported weights appear, ``--weights ema`` exports the EMA, and the
command prints the upload line without running it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from training_data import make_dataset, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _front_matter(card: str) -> dict:
    """The Hub's parser (huggingface_hub is pinned); the block must also be the flat form we write."""
    from huggingface_hub.repocard import metadata_load

    assert re.match(r"^---\n(.*?\n)---\n", card, re.S), "the card must open with a --- YAML block"
    meta = metadata_load_text(card, metadata_load)
    assert isinstance(meta, dict)
    return meta


def metadata_load_text(card: str, loader) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "README.md"
        p.write_text(card, encoding="utf-8")
        return loader(p)


def _adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(folder.rglob("*.safetensors")):
        out.update({f"{p.parent.name}/{k}": v for k, v in load_file(str(p)).items()})
    return out


def _save_evaluation(ws, rid: str, sha: str, fd: float) -> None:
    from medart_core.evaluate import EvalResult, save_result

    profile = {"checkpoint": "card@4", "checkpoint_sha256": sha, "created_at": "2026-12-07T18:00:00Z",
               "extractor": "inception-v3", "n_real": 6, "n_generated": 6, "dataset": "mini"}
    metrics = {"overall": {"n": 6, "fd": fd, "fd_ci": [fd - 1.5, fd + 2.25], "kid": 0.0123, "kid_std": 0.0045},
               "per_class": {}}
    save_result(ws, EvalResult(id=rid, profile=profile, metrics=metrics))


def test_model_card_metadata_privacy_evaluations_and_ema_export(ws, store, tmp_path, capsys):
    from medart_core.checkpoint import find_checkpoint, weights_file
    from medart_core.cli import main
    from medart_core.export import export_model
    from medart_core.generate import file_sha256
    from medart_core.train import train

    ids = make_dataset(ws, store)
    for i in ids[:4]:
        store.approve(i, reviewer="amy", expected_version=store.current(i).version)
    train(tiny_train_config(ema={"decay": 0.9}, lr=1e-2), ws, store, run_name="card")
    ck = find_checkpoint(ws, "card", None)
    raw_sha, ema_sha = file_sha256(weights_file(ck, "raw")), file_sha256(weights_file(ck, "ema"))
    _save_evaluation(ws, "20261207-raw", raw_sha, 123.25)
    _save_evaluation(ws, "20261207-other", "0" * 64, 987.5)     # another checkpoint's: must not appear

    out = tmp_path / "raw"
    assert main(["export-model", "--workspace", str(ws.root), "--run", "card", "--out", str(out),
                 "--adapters-only"]) == 0
    printed = capsys.readouterr().out
    assert f"huggingface-cli upload <your-namespace>/card {out} ." in printed
    assert f"hf upload <your-namespace>/card {out} ." in printed
    card = (out / "README.md").read_text(encoding="utf-8")
    assert (out / "adapters" / "README.md").read_text(encoding="utf-8") == card

    meta = _front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"text-to-image", "diffusers", "lora", "pixart-alpha", "medical", "med-art", "hldf"} <= set(meta["tags"])
    assert meta["license"] == "other" and "base_model" not in meta      # tiny is no Hub model: no fake id
    assert "tiny/demo (random or demo weights, not a real model)" in card
    assert "random-weight demo backbone" in card.lower()
    assert "**Research use only, not for diagnosis or clinical decisions.**" in card.split("## ")[0]

    # Training config, EMA and which weights; data summary by counts only.
    assert "LoRA rank 2" in card and "every 3 steps" in card and "2 DPM-Solver++ sample steps" in card
    assert "Exported weights: raw" in card and "decay 0.9" in card
    assert "class0 (3), class1 (3)" in card and "modality generic" in card and "approved 4" in card
    for i in ids:
        rec, st = store.get_image(i), store.current(i)
        for ident in (rec.file_name, Path(rec.file_name).name, Path(rec.file_name).stem, rec.pixel_hash):
            assert ident not in card, ident
        assert st.text and st.text not in card, st.text
        assert st.text.lower() not in card.lower()

    # The stored evaluation of these weights, with its interval and profile id; not the other one's.
    assert "123.2 [121.8, 125.5]" in card and "0.0123 ± 0.0045" in card and "20261207-raw" in card
    assert "987.5" not in card and "20261207-other" not in card
    assert re.search(r"\| `[0-9a-f]{12}` \| `20261207-raw` \|", card)

    # The EMA export: the EMA tensors, not the raw ones, and a card saying so (no raw evaluation).
    export_model(ws, "card", tmp_path / "ema", merged=False, weights="ema")
    ema_card = (tmp_path / "ema" / "README.md").read_text(encoding="utf-8")
    assert "Exported weights: ema" in ema_card and "20261207-raw" not in ema_card
    raw_t, ema_t = _adapter_tensors(out / "adapters"), _adapter_tensors(tmp_path / "ema" / "adapters")
    assert raw_t.keys() == ema_t.keys() and raw_t
    assert any(not raw_t[k].equal(ema_t[k]) for k in raw_t)
    _save_evaluation(ws, "20261207-ema", ema_sha, 55.5)
    export_model(ws, "card", tmp_path / "ema2", merged=False, weights="ema")
    assert "20261207-ema" in (tmp_path / "ema2" / "README.md").read_text(encoding="utf-8")


def test_model_card_of_a_hub_backbone_names_it_and_its_licence():
    from medart_core.model_card import build_model_card
    from medart_core.train_config import TrainConfig

    hub_id = "PixArt-alpha/PixArt-XL-2-512x512"     # only written into the card's text, never loaded
    cfg = TrainConfig.from_dict({"backbone": hub_id, "ema": {"decay": 0.999}})
    card = build_model_card(cfg=cfg, provenance={"checkpoint": "r/step_000010", "weights": "ema"}, step=10,
                            is_random=False, weights="ema")
    meta = _front_matter(card)
    assert meta["base_model"] == hub_id and meta["license"] == "openrail++"
    assert "random-weight" not in card and "Exported weights: ema" in card
    assert f'PixArtAlphaPipeline.from_pretrained("{hub_id}")' in card
    assert "No stored evaluation" in card

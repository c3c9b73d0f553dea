"""Visual Symptom Generator: drafters, constraints, resumable dataset captioning, prompts, CLI.

Real parts throughout: a real SQLite caption store, tiny but real transformers models built from configs
(tests/tiny_models.py), and the tiny backbone's T5 tokenizer for token counts. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medart_core import vsg
from medart_core.errors import ConfigError, MissingWeightsError
from medart_core.prompts import (PromptTemplate, default_prompt, load_prompt, load_prompts, save_prompt)
from medart_core.seeds import derive_seed

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    from tiny_models import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "vlm")


@pytest.fixture(scope="session")
def tiny_s2s_dir(tmp_path_factory):
    from tiny_models import build_tiny_seq2seq

    return build_tiny_seq2seq(tmp_path_factory.mktemp("tiny-s2s") / "t5")


@pytest.fixture(scope="session")
def tiny_vlm(tiny_vlm_dir, tiny_tok):
    """One loaded drafter shared by tests (loading is the slow part); tests set their own prompt/modality."""
    d = vsg.VLMDrafter(str(tiny_vlm_dir), tokenizer=tiny_tok, max_retries=2, max_new_tokens=16, batch_size=2)
    d.load()
    return d


def _png(path: Path, seed: int, size=(40, 48)) -> tuple[str, int, int]:
    arr = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return hashlib.sha256(arr.tobytes()).hexdigest(), size[0], size[1]


def make_dataset(ws, store, name, labels, *, modality="endoscopy", meta=None, drafts=None, seed0=0):
    """A small dataset of random RGB images, one per label entry; returns the image ids."""
    from medart_core.captions import ImageRecord

    store.create_dataset(name, modality=modality, meta=meta or {})
    records = []
    for i, label in enumerate(labels):
        fname = f"images/img{i:03d}.png"
        h, w, hh = _png(ws.dataset_dir(name) / fname, seed0 + i)
        records.append(ImageRecord(None, name, fname, label, h, w, hh, {"test": True}))
    return store.add_images(name, records, drafts=drafts)


def drafts_of(store, image_id, key=None):
    return [e for e in store.history(image_id) if e.kind == "draft"
            and (key is None or (e.params or {}).get("config_key") == key)]


# ------------------------------------------------------------------------------------------------
# template captions
# ------------------------------------------------------------------------------------------------
def test_template_caption_exact_strings():
    assert vsg.template_caption("ulcerative-colitis", "endoscopy") == "An endoscopic image of ulcerative colitis"
    assert vsg.template_caption("dyed-lifted-polyps", "endoscopy") == "An endoscopic image of dyed lifted polyps"
    assert vsg.template_caption("seborrheic_keratosis", "dermoscopy") == "A dermoscopic image of seborrheic keratosis"
    assert vsg.template_caption("melanoma", "Dermoscopy") == "A dermoscopic image of melanoma"
    assert vsg.template_caption("pneumonia", "xray") == "An X-ray image of pneumonia"
    assert vsg.template_caption("liver__lesion", "ct") == "A CT image of liver lesion"
    assert vsg.template_caption("glioma", "mr") == "An MR image of glioma"
    assert vsg.template_caption("nodule", "radiology") == "A radiological image of nodule"
    assert vsg.template_caption("cyst", "ultrasound") == "An ultrasound image of cyst"
    assert vsg.template_caption("adenocarcinoma", "histology") == "A histology image of adenocarcinoma"
    assert vsg.template_caption("glaucoma", "fundus") == "A fundus photograph of glaucoma"
    assert vsg.template_caption("thing", "generic") == "A medical image of thing"
    assert vsg.template_caption("thing", "no-such-modality") == "A medical image of thing"
    assert vsg.template_caption("thing", None) == "A medical image of thing"
    # The dataset's own seed caption wins; other labels still use the template.
    seeds = {"ct_abdomen": "A CT image of the abdomen"}
    assert vsg.template_caption("ct_abdomen", "generic", seeds) == "A CT image of the abdomen"
    assert vsg.template_caption("other-class", "generic", seeds) == "A medical image of other class"


def test_template_drafter_writes_exact_drafts_with_provenance(ws, store, tiny_tok):
    ids = make_dataset(ws, store, "kv", ["ulcerative-colitis", "polyps", "normal-z-line"], modality="endoscopy",
                       meta={"seed_captions": {"polyps": "An endoscopic image of colon polyps"}})
    d = vsg.TemplateDrafter(tokenizer=tiny_tok)
    rep = vsg.caption_dataset(ws, store, "kv", d)
    assert (rep.done, rep.total, rep.drafted, rep.failures, rep.skipped) == (3, 3, 3, 0, 0)
    texts = [store.current(i).text for i in ids]
    assert texts == ["An endoscopic image of ulcerative colitis", "An endoscopic image of colon polyps",
                     "An endoscopic image of normal z line"]
    ev = drafts_of(store, ids[0])[-1]
    assert ev.source == "template" and ev.params["config_key"] == d.config_key
    assert ev.params["ok"] is True and ev.params["attempts"] == 1
    assert ev.seed == derive_seed(0, store.get_image(ids[0]).pixel_hash, bits=31)
    assert ev.batch_id == rep.batch_id


def test_sample_dataset_seed_captions(ws, store):
    data = pytest.importorskip("medart_core.data")
    data.build_sample_dataset(ws, store, "sample")
    info = store.dataset_info("sample")
    seeds = info.meta["seed_captions"]
    assert seeds and set(seeds) == set(store.labels("sample"))
    for label, seed in seeds.items():
        assert vsg.template_caption(label, info.modality, seeds) == seed
    # The sample's stored template drafts are exactly those seed captions.
    d = vsg.TemplateDrafter(tokenizer=None)
    d.prepare(ws, store, "sample")
    for rec in store.list_images("sample", limit=20):
        assert d.seed_caption(rec.label) == seeds[rec.label]
        assert store.current(rec.id).text == seeds[rec.label]


# ------------------------------------------------------------------------------------------------
# constraints
# ------------------------------------------------------------------------------------------------
def test_starts_with_seed():
    seed = "An endoscopic image of polyps"
    assert vsg.starts_with_seed("An endoscopic image of polyps, reddish and round.", seed)
    assert vsg.starts_with_seed("  an  ENDOSCOPIC image\nof polyps showing a red surface", seed)
    assert vsg.starts_with_seed('"An endoscopic image of polyps" with a stalk', seed)
    assert vsg.starts_with_seed("An endoscopic image of polyps with x", seed + ".")
    assert not vsg.starts_with_seed("This endoscopic image of polyps shows", seed)
    assert not vsg.starts_with_seed("An endoscopic image of polypsis", seed)
    assert not vsg.starts_with_seed("", seed)


def test_parroting_rules():
    feats = default_prompt("endoscopy").features
    seed = "An endoscopic image of polyps"
    prompt = default_prompt("endoscopy").render(seed, "polyps")
    # 1. the feature list in list form (any order, bullets or commas): flagged
    assert vsg.parroting_reason(f"{seed}: specific colour, shape, surrounding mucosa, surface texture.", feats)
    assert vsg.parroting_reason(f"{seed}.\n- shape\n- surface texture\n- bleeding condition\n- specific color", feats)
    assert vsg.parroting_reason(f"{seed} 1. shape 2. surface texture 3. specific colour 4. other relevant details",
                                feats)
    # three in a row is below the bar of four
    assert vsg.parroting_reason(f"{seed}: shape, surface texture and bleeding condition are described.", feats) is None
    # a real description that names the features with content is not parroting
    real = (f"{seed} with a reddish specific colour, an oval shape, pale surrounding mucosa, a smooth surface "
            "texture and no bleeding condition.")
    assert vsg.parroting_reason(real, feats, prompt, seed) is None
    # 2. copying eight words of the instructions
    echo = f"{seed}. Write one short paragraph in plain sentences, not a list please."
    assert "copies the prompt" in vsg.parroting_reason(echo, feats, prompt, seed)
    # the seed itself (which every answer repeats) is not an echo
    assert vsg.parroting_reason(f"{seed} and more text here", feats, prompt, seed) is None
    # short feature lists: two features side by side is prose, all three of a three-item list is the list
    assert vsg.parroting_reason(f"{seed}, colour and border irregular.", ["colour", "border"]) is None
    assert vsg.parroting_reason(f"{seed}: colour, border and asymmetry.", ["colour", "border", "asymmetry"])
    assert vsg.parroting_reason(f"{seed}: colour, border.", ["colour", "border", "asymmetry"]) is None


def test_token_count_uses_backbone_tokenizer(tiny_tok):
    from medart_core.backbone import count_tokens

    # "polyps" is one piece in the tiny backbone's T5 vocabulary; count_tokens adds </s>.
    assert tiny_tok.tokenize("polyps") == ["▁polyps"]
    seed = "polyps"
    at_limit = " ".join(["polyps"] * 119)            # 119 + </s> = 120 tokens
    over = " ".join(["polyps"] * 120)                # 121 tokens
    assert count_tokens(tiny_tok, at_limit) == 120 and count_tokens(tiny_tok, over) == 121
    ok = vsg.check_caption(at_limit, seed=seed, tokenizer=tiny_tok)
    assert ok.ok and ok.n_tokens == 120
    bad = vsg.check_caption(over, seed=seed, tokenizer=tiny_tok)
    assert not bad.ok and [v.code for v in bad.violations] == ["length"]
    assert "121 T5 tokens" in bad.reasons[0]
    # severities rank drafts: a missing seed is worse than being a little long
    miss = vsg.check_caption("something else", seed="An endoscopic image of polyps", tokenizer=tiny_tok)
    assert miss.severity > bad.severity


class Scripted(vsg.Drafter):
    """A real Drafter whose model is a script of answers, one per attempt (to test the retry policy exactly)."""
    kind = "scripted"
    needs_image = False

    def __init__(self, answers, **kw):
        super().__init__(**kw)
        self.answers, self.calls = list(answers), []

    @property
    def source(self):
        return "scripted"

    def _generate(self, items, seeds):
        self.calls.append(list(seeds))
        return [(self.answers[min(len(self.calls) - 1, len(self.answers) - 1)], "p") for _ in items]


def test_retry_policy_keeps_least_bad_attempt_and_stops(tiny_tok):
    seed = "An endoscopic image of polyps"
    long = seed + " " + " ".join(["polyps"] * 130)
    parrot = f"{seed}: specific colour, shape, surrounding mucosa, surface texture"
    d = Scripted(["nonsense", parrot, long, "nonsense again"], tokenizer=tiny_tok, max_retries=3,
                 prompt=default_prompt("endoscopy"))
    r = d.draft(None, "polyps", seed, seed=7)
    assert r.attempts == 4 and len(d.calls) == 4 and not r.ok          # 1 + max_retries, then stop
    assert r.text == long and r.reasons == [f"{vsg.check_caption(long, seed=seed, tokenizer=tiny_tok).n_tokens} "
                                            "T5 tokens, over PixArt's limit of 120"]
    assert r.params["attempt"] == 3 and r.seed == vsg.attempt_seed(7, 2) != 7
    assert [c[0] for c in d.calls] == [vsg.attempt_seed(7, k) for k in range(4)]   # a new seed per redraw
    assert "kept attempt 3" in r.note
    # Stops at the first good answer and says what was redrawn.
    d = Scripted(["nonsense", seed + " with a red rim."], tokenizer=tiny_tok, max_retries=5)
    r = d.draft(None, "polyps", seed, seed=7)
    assert r.ok and r.attempts == 2 and len(d.calls) == 2 and r.text == seed + " with a red rim."
    assert "redrawn 1 time(s)" in r.note and "does not start with the seed" in r.note
    # max_retries=0 means exactly one attempt.
    d = Scripted(["nonsense"], tokenizer=tiny_tok, max_retries=0)
    assert d.draft(None, "polyps", seed, seed=1).attempts == 1 and len(d.calls) == 1
    with pytest.raises(ConfigError):
        Scripted(["x"], tokenizer=tiny_tok, max_retries=-1)


def test_good_redraft_lifts_vsg_flag_but_not_human_status(ws, store, tiny_tok):
    ids = make_dataset(ws, store, "fl", ["polyps", "polyps"], modality="endoscopy")
    rep = vsg.caption_dataset(ws, store, "fl", Scripted(["nonsense"], tokenizer=tiny_tok, max_retries=1))
    assert sorted(rep.flagged) == ids and all(store.current(i).status == "needs-second-read" for i in ids)
    # A human confirms the flag on the second image: the VSG must not lift that one.
    st = store.current(ids[1])
    store.set_status(ids[1], "needs-second-read", reviewer="ann", expected_version=st.version)
    rep = vsg.caption_dataset(ws, store, "fl", vsg.TemplateDrafter(tokenizer=tiny_tok))
    assert rep.failures == 0
    assert store.current(ids[0]).status == "pending"
    assert store.current(ids[1]).status == "needs-second-read"


def test_unreadable_image_is_reported_not_fatal(ws, store, tiny_tok):
    ids = make_dataset(ws, store, "broken", ["polyps"] * 3, modality="endoscopy")
    ws.image_path("broken", store.get_image(ids[1]).file_name).unlink()
    ws.image_path("broken", store.get_image(ids[2]).file_name).write_bytes(b"not a png")

    class NeedsPixels(Scripted):
        needs_image = True

    d = NeedsPixels(["An endoscopic image of polyps with a red rim."], tokenizer=tiny_tok)
    rep = vsg.caption_dataset(ws, store, "broken", d)
    assert (rep.done, rep.drafted, rep.failures) == (3, 1, 2)
    assert [i for i, _ in rep.errors] == ids[1:]
    assert "missing" in rep.errors[0][1] and "cannot be read" in rep.errors[1][1]
    assert store.current(ids[0]).text == "An endoscopic image of polyps with a red rim."
    assert drafts_of(store, ids[1]) == [] and drafts_of(store, ids[2]) == []


# ------------------------------------------------------------------------------------------------
# VLM drafter
# ------------------------------------------------------------------------------------------------
def test_tiny_vlm_loads_with_auto_classes(tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_vlm_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)
    assert proc.chat_template and "<image>" in proc.tokenizer.get_vocab()
    assert model.config.image_token_index == proc.tokenizer.convert_tokens_to_ids("<image>")


def test_vlm_retries_cap_and_flag(ws, store, tiny_vlm):
    ids = make_dataset(ws, store, "endo", ["polyps", "ulcerative-colitis", "polyps"], modality="endoscopy")
    seen = []
    rep = vsg.caption_dataset(ws, store, "endo", tiny_vlm, progress=lambda *a: seen.append(a))
    # Gibberish never starts with the seed: every image went through 1 + max_retries attempts and was flagged.
    assert (rep.total, rep.done, rep.drafted, rep.failures) == (3, 3, 3, 3)
    assert sorted(rep.flagged) == sorted(ids)
    assert seen[0] == (0, 3, 0) and seen[-1] == (3, 3, 3)
    for image_id in ids:
        ev = drafts_of(store, image_id)[-1]
        assert ev.source == f"vlm:{tiny_vlm.model_spec}"
        assert ev.params["attempts"] == 3 and ev.params["ok"] is False and "seed" in ev.params["violations"]
        assert ev.params["temperature"] == 0.8 and ev.params["top_k"] == 50 and ev.params["top_p"] == 0.9
        assert ev.prompt.startswith(vsg.template_caption(store.get_image(image_id).label, "endoscopy"))
        assert "after 3 attempt(s)" in ev.note and "does not start with the seed" in ev.note
        st = store.current(image_id)
        assert st.status == "needs-second-read" and st.reviewer == "vsg" and st.text == ev.text
        status_ev = [e for e in store.history(image_id) if e.kind == "status"][-1]
        assert status_ev.reviewer == "vsg" and "attempt" in status_ev.note


def test_vlm_same_seed_same_draft(ws, store, tiny_vlm):
    ids = make_dataset(ws, store, "endo2", ["polyps", "polyps"], modality="endoscopy")
    tiny_vlm.prepare(ws, store, "endo2")
    img = Image.open(ws.image_path("endo2", store.get_image(ids[0]).file_name)).convert("RGB")
    a = tiny_vlm.draft(img, "polyps", seed=1234)
    b = tiny_vlm.draft(img, "polyps", seed=1234)
    c = tiny_vlm.draft(img, "polyps", seed=99)
    assert a.text == b.text and a.seed == b.seed and a.attempts == b.attempts
    assert a.text != c.text
    # A stored draft's seed reproduces its text, even though it was drafted inside a batch of two.
    vsg.caption_dataset(ws, store, "endo2", tiny_vlm)
    ev = drafts_of(store, ids[0])[-1]
    # The stored seed is the kept attempt's own seed: one attempt with it gives the stored text.
    first = tiny_vlm._generate([vsg.DraftItem("polyps", vsg.template_caption("polyps", "endoscopy"), ev.seed, img)],
                               [ev.seed])[0][0]
    assert vsg.clean_text(first) == ev.text


def test_vlm_batch_composition_does_not_change_drafts(tiny_vlm, tiny_tok):
    imgs = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8))
            for i in range(3)]
    items = [vsg.DraftItem("polyps", "An endoscopic image of polyps", 50 + i, im) for i, im in enumerate(imgs)]
    tiny_vlm.prompt = default_prompt("endoscopy")
    together = [t for t, _ in tiny_vlm._generate(items, [7, 8, 9])]
    alone = [tiny_vlm._generate([it], [s])[0][0] for it, s in zip(items, [7, 8, 9])]
    assert together == alone


# ------------------------------------------------------------------------------------------------
# shorten
# ------------------------------------------------------------------------------------------------
def test_shorten_only_over_limit_and_resumes(ws, store, tiny_tok, tiny_s2s_dir):
    long_text = "An endoscopic image of polyps " + "with a reddish round surface " * 30
    ids = make_dataset(ws, store, "sh", ["polyps", "polyps"], modality="endoscopy",
                       drafts=[(long_text, "import"), ("An endoscopic image of polyps, small.", "import")])
    d = vsg.ShortenDrafter(str(tiny_s2s_dir), tokenizer=tiny_tok, max_retries=1, min_new_tokens=4, max_new_tokens=12)
    rep = vsg.caption_dataset(ws, store, "sh", d)
    assert (rep.total, rep.done, rep.drafted, rep.skipped) == (2, 2, 1, 1)
    ev = drafts_of(store, ids[0], d.config_key)[-1]
    assert ev.source == f"shorten:{Path(tiny_s2s_dir).resolve()}"
    assert ev.prompt == "simplify: " + long_text
    assert ev.params["num_beams"] == 4 and ev.params["min_new_tokens"] == 4 and ev.params["max_new_tokens"] == 12
    assert ev.params["input_tokens"] > 120
    # At most 12 new tokens, and each token starts at most one word (Metaspace), so at most 12 words.
    assert 1 <= len(ev.text.split()) <= 12 and ev.text != long_text
    assert drafts_of(store, ids[1], d.config_key) == []
    # Rerun: nothing new (its own output is current, or the same input was already shortened).
    rep2 = vsg.caption_dataset(ws, store, "sh", d)
    assert rep2.drafted == 0 and rep2.skipped == 2
    assert len(drafts_of(store, ids[0], d.config_key)) == 1


def test_shorten_defaults_follow_paper(tiny_s2s_dir, tiny_tok):
    d = vsg.ShortenDrafter(str(tiny_s2s_dir), tokenizer=tiny_tok)
    assert (d.prefix, d.num_beams, d.min_new_tokens, d.max_new_tokens) == ("simplify: ", 4, 90, 120)
    assert vsg.make_drafter("shorten").model_spec == "t5-large"
    v = vsg.make_drafter("vlm")
    assert v.model_spec == "llava-hf/llama3-llava-next-8b-hf"
    assert (v.temperature, v.top_k, v.top_p, v.max_new_tokens, v.max_retries) == (0.8, 50, 0.9, 150, 5)


# ------------------------------------------------------------------------------------------------
# dataset runs: resume, stop, never overwrite humans
# ------------------------------------------------------------------------------------------------
def test_resumable_stop_and_restart(ws, store, tiny_tok):
    ids = make_dataset(ws, store, "res", [f"class-{i % 3}" for i in range(7)], modality="dermoscopy")
    d = vsg.TemplateDrafter(tokenizer=tiny_tok, batch_size=2)
    calls = {"n": 0}

    def stop_after_two_batches():
        calls["n"] += 1
        return calls["n"] > 2

    rep1 = vsg.caption_dataset(ws, store, "res", d, should_stop=stop_after_two_batches)
    assert rep1.stopped and rep1.drafted == 4 and rep1.done == 4
    assert sum(len(drafts_of(store, i)) for i in ids) == 4      # committed as made
    rep2 = vsg.caption_dataset(ws, store, "res", vsg.TemplateDrafter(tokenizer=tiny_tok, batch_size=2))
    assert not rep2.stopped and rep2.skipped == 4 and rep2.drafted == 3 and rep2.done == rep2.total == 7
    assert [len(drafts_of(store, i)) for i in ids] == [1] * 7
    # A third run does nothing; a different configuration (another seed) drafts again.
    assert vsg.caption_dataset(ws, store, "res", d).drafted == 0
    other = vsg.TemplateDrafter(tokenizer=tiny_tok, seed=1)
    assert other.config_key != d.config_key
    assert vsg.caption_dataset(ws, store, "res", other).drafted == 7
    assert store.current(ids[0]).text == "A dermoscopic image of class 0"


def test_drafts_never_replace_edits_or_approvals(ws, store, tiny_tok, tiny_vlm):
    ids = make_dataset(ws, store, "hum", ["polyps"] * 4, modality="endoscopy",
                       drafts=[("old draft", "import")] * 4)
    edited, approved, rejected, free = ids
    store.edit(edited, "Human text.", reviewer="ann", expected_version=store.current(edited).version)
    store.approve(approved, reviewer="ann", expected_version=store.current(approved).version)
    store.set_status(rejected, "rejected", reviewer="ann", expected_version=store.current(rejected).version)
    vsg.caption_dataset(ws, store, "hum", vsg.TemplateDrafter(tokenizer=tiny_tok))
    assert store.current(edited).text == "Human text."
    assert store.current(approved).text == "old draft" and store.current(approved).status == "approved"
    assert store.current(free).text == "An endoscopic image of polyps"
    assert all(drafts_of(store, i)[-1].source == "template" for i in ids)   # recorded for every image
    # Failing VLM drafts: recorded, but the human's images keep their text and status (no vsg flag).
    rep = vsg.caption_dataset(ws, store, "hum", tiny_vlm)
    assert rep.failures == 4 and rep.flagged == [free]
    assert store.current(edited).text == "Human text." and store.current(edited).status == "pending"
    assert store.current(approved).status == "approved" and store.current(approved).text == "old draft"
    assert store.current(rejected).status == "rejected"
    assert store.current(free).status == "needs-second-read"
    assert all(drafts_of(store, i)[-1].source.startswith("vlm:") for i in ids)


def test_flag_does_not_clobber_concurrent_human(ws, store, tiny_tok):
    (image_id,) = make_dataset(ws, store, "race", ["polyps"], modality="endoscopy")

    class Racing(vsg.TemplateDrafter):
        """Drafts text that breaks the rules, while a human approves the image mid-draft."""
        deterministic = True

        def _generate(self, items, seeds):
            store.approve(image_id, reviewer="bob", expected_version=store.current(image_id).version)
            return [("no seed here", None) for _ in items]

    rep = vsg.caption_dataset(ws, store, "race", Racing(tokenizer=tiny_tok))
    assert rep.failures == 1 and rep.flagged == []
    st = store.current(image_id)
    assert st.status == "approved" and st.reviewer == "bob"
    assert "Needs a second read" in drafts_of(store, image_id)[-1].note


# ------------------------------------------------------------------------------------------------
# missing weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_missing_weights_errors(tmp_path, tiny_tok):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        vsg.VLMDrafter(str(tmp_path / "no-such-folder"), tokenizer=tiny_tok)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="folder"):
        vsg.VLMDrafter(str(empty), tokenizer=tiny_tok).load()
    with pytest.raises(MissingWeightsError, match="folder"):
        vsg.ShortenDrafter(str(empty), tokenizer=tiny_tok).load()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(MissingWeightsError, match="huggingface-cli download nobody-here/no-such-vlm"):
        vsg.VLMDrafter("nobody-here/no-such-vlm", tokenizer=tiny_tok).load()
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE"):
        vsg.ShortenDrafter("no-such-t5-model-xyz", tokenizer=tiny_tok).load()


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------
def test_prompt_defaults_cover_the_paper():
    p = default_prompt("endoscopy").validate()
    assert p.features == ["specific colour", "shape", "surrounding mucosa", "surface texture",
                          "bleeding condition", "other relevant details"]
    text = p.render("An endoscopic image of polyps", "polyps")
    assert text.startswith("An endoscopic image of polyps\n")
    assert "100 words" in text and all(f in text for f in p.features)
    assert {"border", "asymmetry"} <= set(default_prompt("dermoscopy").features)
    assert default_prompt("ct").template == default_prompt("radiology").template
    assert default_prompt("unknown").modality == "generic"


def test_prompts_round_trip_and_validation(ws, store):
    store.create_dataset("p", modality="dermoscopy")
    assert load_prompt(ws, "p", "dermoscopy").template == default_prompt("dermoscopy").template  # no file yet
    mine = PromptTemplate("dermoscopy", "{seed}. Describe the {class} lesion: colour, border.", ["colour", "border"])
    path = save_prompt(ws, "p", mine)
    assert path == ws.prompts_path("p")
    raw = json.loads(path.read_text())
    assert raw["templates"]["dermoscopy"] == {"template": mine.template, "features": ["colour", "border"]}
    assert load_prompt(ws, "p", "dermoscopy") == mine
    assert load_prompts(ws, "p")["endoscopy"] == default_prompt("endoscopy")   # others stay default
    assert [f.name for f in path.parent.iterdir() if f.name.endswith('.tmp')] == []  # atomic write cleaned up

    for bad, why in [("Describe {class}.", "must contain {seed}"), ("{seed} {colour}", "unknown placeholder"),
                     ("{seed} {", "unbalanced"), ("", "empty")]:
        with pytest.raises(ConfigError, match=why):
            save_prompt(ws, "p", PromptTemplate("dermoscopy", bad, []))
    assert load_prompt(ws, "p", "dermoscopy") == mine                            # a failed save changed nothing
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="delete the file"):
        load_prompts(ws, "p")
    path.write_text(json.dumps({"templates": {"dermoscopy": {"template": "no seed", "features": []}}}))
    with pytest.raises(ConfigError, match="seed"):
        load_prompts(ws, "p")


def test_drafter_uses_dataset_prompt_and_key_tracks_it(ws, store, tiny_vlm_dir, tiny_tok):
    store.create_dataset("pp", modality="dermoscopy")
    d = vsg.VLMDrafter(str(tiny_vlm_dir), tokenizer=tiny_tok)
    d.prepare(ws, store, "pp")
    assert d.prompt == default_prompt("dermoscopy")
    k1 = d.config_key
    assert k1 == vsg.VLMDrafter(str(tiny_vlm_dir), tokenizer=tiny_tok, modality="dermoscopy",
                                prompt=default_prompt("dermoscopy")).config_key
    save_prompt(ws, "pp", PromptTemplate("dermoscopy", "{seed}: colour and border of {class}?", ["colour", "border"]))
    d2 = vsg.VLMDrafter(str(tiny_vlm_dir), tokenizer=tiny_tok)
    d2.prepare(ws, store, "pp")
    assert d2.prompt.features == ["colour", "border"] and d2.config_key != k1
    assert d2.prompt.render("A dermoscopic image of nevus", "nevus") == \
        "A dermoscopic image of nevus: colour and border of nevus?"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _cli(*args, timeout=180):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "medart_core", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cli_caption_template_and_review(ws, store):
    ids = make_dataset(ws, store, "cli", ["polyps", "ulcerative-colitis", "polyps"], modality="endoscopy")
    store.edit(ids[2], "Hand-written.", reviewer="ann", expected_version=store.current(ids[2]).version)
    r = _cli("caption", "--workspace", str(ws.root), "--dataset", "cli", "--drafter", "template",
             "--backbone", "tiny")
    assert r.returncode == 0, r.stderr
    assert "3 drafted" in r.stdout
    assert store.current(ids[1]).text == "An endoscopic image of ulcerative colitis"
    r = _cli("review", "--workspace", str(ws.root), "--dataset", "cli", "--approve-drafts", "--reviewer", "cleo")
    assert r.returncode == 0, r.stderr
    assert "Approved 2 " in r.stdout
    assert [store.current(i).status for i in ids] == ["approved", "approved", "pending"]
    assert store.current(ids[0]).reviewer == "cleo"
    # A missing model is a one-line error, never a traceback or a hang.
    r = _cli("caption", "--workspace", str(ws.root), "--dataset", "cli", "--drafter", "vlm", "--model",
             "nobody-here/no-such-vlm", "--backbone", "tiny")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr

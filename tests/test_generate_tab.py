"""The Generate tab: its handlers called directly, then through gradio_client against a live server that
has only this tab: generate from a cpu-smoke checkpoint, and the returned image's sidecar regenerates the
same bytes."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from training_data import make_dataset

from medart_core.constants import RANDOM_LABEL

PROMPT = "An endoscopic image of polyps"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A workspace with a dataset (two classes, class0 with approved captions) and one cpu-smoke run."""
    from medart_core.captions import CaptionStore
    from medart_core.train import TrainConfig, train
    from medart_core.workspace import Workspace
    from studio.context import StudioContext

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    ws = Workspace.open(tmp_path_factory.mktemp("gentab") / "ws")
    store = CaptionStore.for_workspace(ws)
    ids = make_dataset(ws, store, "mini", n=4)
    for i in ids[::2]:  # class0
        store.approve(i, reviewer="dr ana", expected_version=store.current(i).version)
    train(TrainConfig.from_preset("cpu-smoke", dataset="mini", captions="latest", max_steps=2, checkpoint_every=2,
                                  val_images=0, export_merged=False, batch_size=1), ws, store, run_name="smoke")
    torch.set_num_threads(n)
    yield StudioContext(ws=ws, store=store, backbone_spec="tiny")
    store.close()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- handlers, called directly ------------------------------------------------------------------------
def test_token_counter_names_the_tiny_tokenizer(env):
    from studio import generate_tab as tab

    out = tab.token_counter(env, PROMPT)
    assert "/ 120 tokens" in out and "tiny Unigram tokenizer" in out and "not T5" in out
    long = " ".join(["reddish mucosa"] * 100)
    two = tab.token_counter(env, f"{PROMPT}\n{long}")
    assert "prompt 1:" in two and "prompt 2:" in two and "gen-tok-over" in two and "never seen" in two
    assert "&lt;b&gt;" in tab.token_counter(env, long + " <b>x</b>"), "prompt text is escaped"


def test_prompt_tokenizer_lives_on_the_context(env):
    from studio import generate_tab as tab
    from studio.context import StudioContext

    assert not hasattr(tab, "_TOKENIZERS") and not hasattr(tab, "tokenizer_for")
    tok, name = env.prompt_tokenizer()
    assert env.prompt_tokenizer()[0] is tok and "tiny Unigram tokenizer" in name     # made once per context
    other = StudioContext(ws=env.ws, store=env.store, backbone_spec="tiny")
    assert other.prompt_tokenizer()[0] is not tok                                     # no process-wide cache


def test_class_prompts_and_checkpoints(env):
    from studio import generate_tab as tab

    assert tab.dataset_choices(env) == ["mini"]
    assert tab.class_choices(env, "mini") == ["class0", "class1"]
    assert tab.caption_choices(env, "mini", "class0") == ["An image of class 0 number 0",
                                                          "An image of class 0 number 2"]
    assert tab.caption_choices(env, "mini", "class1") == []         # nothing approved there
    assert tab.checkpoint_choices(env) == ["base", "smoke@2"]
    assert RANDOM_LABEL in tab.banner(env)


def test_generate_reuse_and_regenerate_handlers(env):
    import gradio as gr

    from studio import generate_tab as tab

    seen = []
    out = tab.run_generate(env, f"{PROMPT}\nAn image of class 0 number 0", "", "smoke@2", 1.0, 3, 4.5, 0, True, 2, 0,
                           progress=lambda d, t: seen.append((d, t)))
    assert len(out["gallery"]) == 4 and seen[-1] == (3, 3)           # one chunk of 4 images, 3 steps
    assert all(RANDOM_LABEL in cap and Path(p).suffix == ".png" for p, cap in out["gallery"])
    assert "drawn at random" in out["summary"] and RANDOM_LABEL in out["summary"]
    seed = out["seed"]
    assert [d["seed"] for d in out["details"]] == [seed, seed + 1, seed, seed + 1]
    assert tab.recent_choices(env)[0][1] == out["details"][3]["sidecar"]
    r = tab.reuse_settings(env, out["details"][1]["sidecar"])
    assert (r["prompt"], r["checkpoint"], r["seed"], r["random"], r["n"], r["steps"], r["resolution"]) == (
        PROMPT, "smoke@2", seed + 1, False, 1, 3, 64)
    again = tab.run_regenerate(env, out["details"][1]["sidecar"])
    assert Path(again["details"][0]["path"]).read_bytes() == Path(out["details"][1]["path"]).read_bytes()
    assert "Byte-equal" in again["summary"]
    with pytest.raises(gr.Error):
        tab.run_generate(env, "  \n ", "", "base", 1.0, 3, 4.5, 0, False, 1, 0)


# ---- through a live server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(env):
    import gradio as gr

    from studio.generate_tab import build_generate_tab

    with gr.Blocks() as demo:
        with gr.Tab("Generate"):
            build_generate_tab(env)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_api_generate_from_checkpoint_then_regenerate_same_bytes(live, env):
    import httpx
    from gradio_client import Client

    client = Client(live, verbose=False, download_files=False)
    gallery, summary, seed, details, _recent = client.predict(
        PROMPT, "", "smoke@2", 1.0, 3, 4.5, 123, False, 2, 0, api_name="/generate")
    assert seed == 123 and [d["seed"] for d in details] == [123, 124]
    assert all(d["checkpoint"] == "smoke@2" and d["label"] == RANDOM_LABEL for d in details)
    assert len(gallery) == 2 and all(RANDOM_LABEL in g["caption"] for g in gallery)
    served = httpx.get(gallery[1]["image"]["url"], timeout=30).content
    assert served[:8] == b"\x89PNG\r\n\x1a\n", "the gallery serves the PNG itself, not a webp re-encode"
    assert served == Path(details[1]["path"]).read_bytes()
    g2, summary2, details2, _ = client.predict(details[1]["sidecar"], api_name="/generate_regenerate")
    assert Path(details2[0]["path"]).read_bytes() == Path(details[1]["path"]).read_bytes()
    assert details2[0]["sha256"] == details[1]["sha256"] and "Byte-equal" in summary2
    # a library error reaches the client as a message, not a traceback
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="available steps"):
        client.predict(PROMPT, "", "smoke@9", 1.0, 2, 4.5, 1, False, 1, 0, api_name="/generate")

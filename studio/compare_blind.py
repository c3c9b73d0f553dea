"""The Compare tab's Blind-review panel (``medart_core.blind``). The two images reach the browser as fresh
PIL images (``blind.neutral_pair_images``), so Gradio serves them from its cache under a content hash: no file
name, folder, PNG text chunk or size difference tells a checkpoint (or the real image) apart. Nothing on the
reviewer's side names a source: the results table (which does) is shown once the reviewer has finished the
study, or to the coordinator on request. Keyboard: Alt+← / Alt+→ vote, Alt+F focuses the tag box.

The handlers a blind reviewer needs (start, votes) are ``@requires(ANNOTATOR)`` inside the trainers' tab.
The studies live in ``ctx.reviews`` (one ReviewStore per workspace). Layout (``render_blind``) apart from
wiring (``listen_blind``).
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotation.
from typing import Any, Optional

import gradio as gr

from medart_core import evaluate as E
from medart_core.accounts import ANNOTATOR
from medart_core.blind import neutral_pair_images
from medart_core.constants import MAX_REVIEWER_CHARS
from medart_core.errors import ConfigError
from medart_core.seeds import derive_seed

from .auth import requires
from .compare_metrics import _num, result_choices, results_by_ids
from .context import StudioContext
from .errors import user_errors
from .render import esc

# ------------------------------------------------------------------------------------------------
# Browser side: the keyboard shortcuts
# ------------------------------------------------------------------------------------------------
SHORTCUTS = [("Alt+←", "left is more realistic"), ("Alt+→", "right is more realistic"),
             ("Alt+F", "focus the artefact tag (a tag typed there goes with the next vote)")]

# Alt combos only; ``e.code`` (macOS Alt+F types "ƒ"). A vote fires only while its button is visible (the
# Compare tab and its Blind review sub-tab open) and enabled; a held key (e.repeat) never votes twice.
KEYBOARD_JS = r"""
(() => {
  if (window.__medartBlindKeys) return;
  window.__medartBlindKeys = true;
  const visible = (el) => el && el.offsetParent !== null;
  const button = (id) => {
    const root = document.getElementById(id);
    return root && (root.tagName === 'BUTTON' ? root : root.querySelector('button'));
  };
  document.addEventListener('keydown', (e) => {
    if (!e.altKey || e.ctrlKey || e.metaKey) return;
    let handled = false;
    if (e.code === 'ArrowLeft' || e.code === 'ArrowRight') {
      const btn = button(e.code === 'ArrowLeft' ? 'blind-left' : 'blind-right');
      if (!visible(btn)) return;
      if (!e.repeat && !btn.disabled) btn.click();
      handled = true;
    } else if (e.code === 'KeyF') {
      const box = document.querySelector('#blind-tag textarea, #blind-tag input');
      if (!visible(box)) return;
      box.focus();
      handled = true;
    }
    if (handled) { e.preventDefault(); e.stopPropagation(); }
  }, true);
})();
"""
# Collected by studio.app for the page <head>; the shortcuts' own gr.HTML installs it too (idempotent).
HEAD_JS = KEYBOARD_JS
QUIET = dict(show_progress="hidden")

def study_names(ctx: StudioContext) -> list[str]:
    return [s["name"] for s in ctx.reviews.studies()]


def next_study_name(ctx: StudioContext) -> str:
    names = set(study_names(ctx))
    n = len(names) + 1
    while f"study-{n}" in names:
        n += 1
    return f"study-{n}"


def create_study(ctx: StudioContext, creator: str | None, name: str | None, kind: str, a_id: str | None,
                 b_id: str | None) -> tuple[str, str]:
    """A study from one result (real vs synthetic) or two (checkpoint A vs B); returns (name, message)."""
    if not a_id:
        raise ConfigError("Pick result A (press “List results” first).")
    a = results_by_ids(ctx, [a_id])[0]
    b = results_by_ids(ctx, [b_id])[0] if kind == "checkpoints" and b_id else None
    name = (name or "").strip() or next_study_name(ctx)
    E.create_blind_study(ctx.ws, ctx.store, ctx.reviews, name, kind, a, b, seed=derive_seed(name, "blind"),
                         created_by=creator)
    n = len(a.images)
    return name, f"Study “{name}” created: {n} pairs ({kind}). Reviewers pick it by name below."


def _pos_html(text: str) -> str:
    return f"<div class='blind-pos' id='blind-pos-text'>{esc(text)}</div>"


def blind_view(ctx: StudioContext, study: str | None, reviewer: str | None, notice: str = "") -> dict[str, Any]:
    """The reviewer's next pair (two neutral images, left and right) or, when the study is done, its results."""
    empty = {"state": {"study": study, "pair_id": None}, "left": None, "right": None, "prompt": "",
             "enabled": False, "results": "", "notice": notice}
    if not study:
        return {**empty, "position": _pos_html("Pick a study.")}
    if not reviewer:
        return {**empty, "position": _pos_html("Enter your name to start: every vote is stored with it.")}
    rs = ctx.reviews
    pair = rs.next_pair(study, reviewer)
    if pair is None:
        res = rs.results(study)
        return {**empty, "position": _pos_html(f"Done: all {res['pairs']} pairs of this study reviewed. Thank you."),
                "results": blind_results_html(res)}
    left, right = neutral_pair_images(pair.left, pair.right)
    prompt = f"<div class='cmp-note'>Prompt of both images: {esc(pair.prompt)}</div>" if pair.prompt else ""
    return {"state": {"study": study, "pair_id": pair.pair_id, "shown_to": pair.reviewer}, "left": left,
            "right": right, "prompt": prompt,
            "enabled": True, "notice": notice, "position": _pos_html(f"pair {pair.position + 1} / {pair.total}"),
            "results": "<p class='cmp-note'>The results (which name the sources) appear when you have reviewed every "
                       "pair of this study.</p>"}


def blind_vote(ctx: StudioContext, state: dict[str, Any] | None, reviewer: str | None, choice: str | None,
               tag: str | None) -> dict[str, Any]:
    """Record the vote on the pair on screen, then show the next one."""
    state = state or {}
    study, pair_id = state.get("study"), state.get("pair_id")
    if not study or pair_id is None:
        raise ConfigError("No pair on screen: pick a study and press Start.")
    if not reviewer:
        raise ConfigError("Enter your name (or log in) before voting: every vote is stored with its reviewer.")
    # The left/right order is the reviewer's own: "left" is resolved against the name the pair was shown to.
    ctx.reviews.vote(study, int(pair_id), reviewer, choice, tag, shown_to=state.get("shown_to"))
    what = {"left": "left", "right": "right", None: "artefact flagged"}[choice]
    if tag and tag.strip():
        what += f", tag “{tag.strip()}”"
    return blind_view(ctx, study, reviewer, notice=f"Saved ({what}).")


def blind_results_html(res: dict[str, Any]) -> str:
    """Win rates with 95 % Wilson intervals; for real vs synthetic how often the synthetic image was taken for
    the real one; artefact tags per source."""
    head = (f"<p><b>{esc(res['study'])}</b> ({esc(res['kind'])}): {res['pairs']} pairs, {res['votes']} votes, "
            f"{res['preferences']} preferences by {len(res['reviewers'])} reviewer(s)</p>")

    def tags(src: str) -> str:
        return esc(", ".join(f"{t} ×{n}" for t, n in sorted(res["artefact_tags"].get(src, {}).items())))

    rows = "".join(
        f"<tr><td>{esc(r['source'])}</td><td>{r['wins']}</td><td>{_num(r['win_rate'], 3)}</td>"
        f"<td>[{_num(r['ci'][0], 3)}, {_num(r['ci'][1], 3)}]</td><td>{tags(r['source'])}</td></tr>"
        for r in res["rows"])
    out = (head + "<table class='cmp-table' id='blind-results-table'><thead><tr><th>source</th><th>wins</th>"
           "<th>win rate</th><th>95% CI (Wilson)</th><th>artefact tags</th></tr></thead><tbody>" + rows
           + "</tbody></table>")
    if "synthetic_taken_for_real" in res:
        f = res["synthetic_taken_for_real"]
        out += (f"<p id='blind-fooled'>Synthetic taken for real: <b>{f['count']}</b> of {res['preferences']} "
                f"({_num(f['rate'], 3)}, 95% CI [{_num(f['ci'][0], 3)}, {_num(f['ci'][1], 3)}])</p>")
    return out


def coordinator_results(ctx: StudioContext, study: str | None) -> str:
    if not study:
        raise ConfigError("Pick a study.")
    return blind_results_html(ctx.reviews.results(study))


def _shortcuts_html() -> str:
    keys = " ".join(f"<span><kbd>{esc(k)}</kbd> {esc(a)}</span>" for k, a in SHORTCUTS)
    return f"<div class='cmp-keys' id='blind-keys'>{keys}</div>"


# ------------------------------------------------------------------------------------------------
# Layout and wiring
# ------------------------------------------------------------------------------------------------
def render_blind(c: dict[str, Any]) -> None:
    """The shortcuts, the coordinator's set-up (which names the sources), then the reviewer's pair."""
    gr.HTML(_shortcuts_html(), js_on_load=KEYBOARD_JS, elem_id="blind-shortcuts", padding=False)
    with gr.Accordion("Set up a study (coordinator — this part names the sources)", open=False):
        with gr.Row():
            c["b_kind"] = gr.Radio(["checkpoints", "real-vs-synthetic"], value="checkpoints", label="Pairs",
                                   info="checkpoints: image i of A vs image i of B; real-vs-synthetic: "
                                        "real image i vs generated image i of A")
            c["b_name"] = gr.Textbox(label="Study name (shown to reviewers: don't name a source)",
                                     placeholder="study-1", elem_id="blind-new-name")
        with gr.Row():
            c["b_a"] = gr.Dropdown([], allow_custom_value=True, label="Result A", scale=3, elem_id="blind-a")
            c["b_b"] = gr.Dropdown([], allow_custom_value=True, label="Result B (checkpoints only)", scale=3,
                                   elem_id="blind-b")
            c["b_list"] = gr.Button("List results", scale=0, elem_id="blind-list")
        c["b_create"] = gr.Button("Create study", variant="primary", elem_id="blind-create")
        c["b_setup_note"] = gr.HTML(padding=False, elem_id="blind-setup-note")
        with gr.Row():
            c["b_show_results"] = gr.Button("Show results of the study picked below (reveals the sources)",
                                            elem_id="blind-coord-results")
        c["b_coord"] = gr.HTML(padding=False, elem_id="blind-coord")
    c["b_saved_name"] = gr.BrowserState("", storage_key="medart_reviewer")
    c["b_state"] = gr.State({"study": None, "pair_id": None})
    with gr.Row():
        c["b_reviewer"] = gr.Textbox(label="Reviewer (your name; remembered in this browser)",
                                     max_length=MAX_REVIEWER_CHARS, elem_id="blind-reviewer", scale=2)
        c["b_study"] = gr.Dropdown([], allow_custom_value=True, label="Study", scale=2, elem_id="blind-study")
        c["b_start"] = gr.Button("Start / resume", variant="primary", scale=0, elem_id="blind-start")
    c["b_pos"] = gr.HTML(_pos_html("Pick a study."), padding=False, elem_id="blind-pos")
    c["b_prompt"] = gr.HTML(padding=False, elem_id="blind-prompt")
    with gr.Row():
        c["b_left"] = gr.Image(type="pil", format="png", label="Left", interactive=False, height=420,
                               buttons=[], elem_id="blind-left-img")
        c["b_right"] = gr.Image(type="pil", format="png", label="Right", interactive=False, height=420,
                                buttons=[], elem_id="blind-right-img")
    with gr.Row():
        c["b_vote_left"] = gr.Button("◀ Left is more realistic (Alt+←)", interactive=False,
                                     elem_id="blind-left")
        c["b_vote_right"] = gr.Button("Right is more realistic (Alt+→) ▶", interactive=False,
                                      elem_id="blind-right")
    with gr.Row():
        c["b_tag"] = gr.Textbox(label="Artefact tag (Alt+F; goes with your vote, on the image you did not "
                                      "pick)", max_length=40, scale=4, elem_id="blind-tag")
        c["b_flag"] = gr.Button("Flag artefact (no preference)", interactive=False, scale=1,
                                elem_id="blind-flag")
    c["b_notice"] = gr.HTML(padding=False, elem_id="blind-notice")
    c["b_results"] = gr.HTML(padding=False, elem_id="blind-results")


def _listen_coordinator(ctx: StudioContext, c: dict[str, Any]) -> None:
    """List results, create a study (the source pickers cleared after), show a study's results."""
    @user_errors
    def on_list(dataset):
        ch = result_choices(ctx, dataset or None)
        return gr.Dropdown(choices=ch, value=None), gr.Dropdown(choices=ch, value=None), next_study_name(ctx)

    c["b_list"].click(on_list, c["dataset"], [c["b_a"], c["b_b"], c["b_name"]], api_name="blind_list_results",
                      **QUIET)

    @user_errors
    def on_create(name, kind, a_id, b_id, request: gr.Request):
        created, msg = create_study(ctx, ctx.reviewer_for(request, None), name, kind, a_id, b_id)
        # The source pickers are cleared so the page no longer names the sources.
        return (f"<p class='cmp-note'>{esc(msg)}</p>", gr.Dropdown(choices=[], value=None),
                gr.Dropdown(choices=[], value=None), "", gr.Dropdown(choices=study_names(ctx), value=created))

    c["b_create"].click(on_create, [c["b_name"], c["b_kind"], c["b_a"], c["b_b"]],
                        [c["b_setup_note"], c["b_a"], c["b_b"], c["b_name"], c["b_study"]],
                        api_name="blind_create")

    @user_errors
    def on_coord(study):
        return coordinator_results(ctx, study)

    c["b_show_results"].click(on_coord, c["b_study"], c["b_coord"], api_name="blind_results")



def _listen_reviewer(ctx: StudioContext, c: dict[str, Any]) -> None:
    """Start or resume a study, vote left/right or flag an artefact, remember the reviewer's name."""
    b_out = [c["b_state"], c["b_pos"], c["b_prompt"], c["b_left"], c["b_right"], c["b_vote_left"],
             c["b_vote_right"], c["b_flag"], c["b_notice"], c["b_results"], c["b_tag"]]

    def b_outputs(v: dict[str, Any], clear_tag: bool) -> tuple:
        on = gr.Button(interactive=v["enabled"])
        notice = f"<div class='cmp-note'>{esc(v['notice'])}</div>" if v["notice"] else ""
        return (v["state"], v["position"], v["prompt"], v["left"], v["right"], on, on, on, notice, v["results"],
                "" if clear_tag else gr.skip())

    def keep(message, *args, **kwargs):
        return (gr.skip(),) * 8 + (f"<div class='cmp-warn'>{esc(message)}</div>", gr.skip(), gr.skip())

    @requires(ANNOTATOR)
    @user_errors(keep=keep)
    def on_start(study, typed, request: gr.Request):
        return b_outputs(blind_view(ctx, study, ctx.reviewer_for(request, typed)), clear_tag=True)

    fast = dict(show_progress="hidden", trigger_mode="once")
    c["b_start"].click(on_start, [c["b_study"], c["b_reviewer"]], b_out, api_name="blind_start", **fast)
    # Start alone starts (choosing a study used to start it too: two starts in flight, and the later answer,
    # computed before a quick first vote was stored, put the page back on that pair).

    def voter(choice: Optional[str]):
        @requires(ANNOTATOR)
        @user_errors(keep=keep)
        def on_vote(state, typed, tag, request: gr.Request):
            return b_outputs(blind_vote(ctx, state, ctx.reviewer_for(request, typed), choice, tag), clear_tag=True)
        return on_vote

    vote_in = [c["b_state"], c["b_reviewer"], c["b_tag"]]
    c["b_vote_left"].click(voter("left"), vote_in, b_out, api_name="blind_vote_left", **fast)
    c["b_vote_right"].click(voter("right"), vote_in, b_out, api_name="blind_vote_right", **fast)
    c["b_flag"].click(voter(None), vote_in, b_out, api_name="blind_flag", **fast)

    @requires(ANNOTATOR)
    @user_errors
    def on_reviewer(name):
        return (name or "").strip()[:MAX_REVIEWER_CHARS]

    c["b_reviewer"].change(on_reviewer, c["b_reviewer"], c["b_saved_name"], api_name=False, queue=False, **QUIET)


def listen_blind(ctx: StudioContext, c: dict[str, Any]) -> None:
    """The coordinator's events (list results, create a study, its results) and the reviewer's (start, vote)."""
    _listen_coordinator(ctx, c)
    _listen_reviewer(ctx, c)

"""The Dataset tab in headless Chromium: the gallery shows one page, a click shows class, caption, provenance."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_app import free_port  # noqa: E402


@pytest.fixture
def served_app(ws, store, tmp_path):
    """Build a small real dataset (imports of generated PNGs) and serve the studio in-process."""
    import numpy as np
    from PIL import Image

    from medart_core.data import import_images
    from studio.app import build_app, launch_kwargs
    from studio.context import StudioContext

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for label in ("polyps", "esophagitis", "normal-cecum"):
        (src / label).mkdir(parents=True)
        for i in range(14):
            arr = (rng.random((160, 160, 3)) * 255).astype("uint8")
            Image.fromarray(arr).save(src / label / f"{label}_{i}.png")
    report = import_images(ws, store, src, "kvasir-mini", modality="endoscopy")
    assert len(report.imported) == 42
    ctx = StudioContext(ws=ws, store=store, backbone_spec="tiny")
    demo = build_app(ctx)
    port = free_port()
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            allowed_paths=[str(ws.datasets_dir)], **launch_kwargs())
    yield url, store
    demo.close()


@pytest.mark.browser
@pytest.mark.slow
def test_dataset_tab_in_chromium(served_app, chromium, tmp_path):
    url, store = served_app
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#ds-gallery img", timeout=60_000)
    summary = page.locator("#ds-summary").inner_text()
    assert "kvasir-mini" in summary and "42 images in 3 classes" in summary
    assert page.locator("#ds-gallery img").count() == 24, "only the first page is sent"
    assert "random-weight demo backbone" in page.locator("#ds-banner").inner_text()

    page.locator("#ds-gallery img").nth(2).click()
    page.wait_for_function("document.querySelector('#ds-head') && document.querySelector('#ds-head').innerText.includes('class')")
    head = page.locator("#ds-head").inner_text()
    caption = page.locator("#ds-caption textarea").input_value()
    assert "Image #" in head
    image_id = int(head.split("#")[1].split()[0])
    assert caption == store.current(image_id).text
    assert store.get_image(image_id).label in head

    page.locator("#ds-next").click()
    page.wait_for_function("document.querySelector('#ds-summary').innerText.includes('page 2 of 2')")
    page.wait_for_function("document.querySelectorAll('#ds-gallery img').length == 18")
    shot = tmp_path / "dataset_tab.png"
    page.screenshot(path=str(shot), full_page=True)
    out_dir = os.environ.get("MEDART_SCREENSHOT_DIR")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out_dir) / "dataset_tab.png")
    page.close()

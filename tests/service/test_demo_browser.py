"""The web demo at "/" in a real headless browser (Debian's chromium driven by Playwright) against the live app.

Screenshots go to test-output/ (git-ignored). Skips, saying why, without Playwright or a chromium binary
(`make tools` installs chromium as root).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "test-output"
SAMPLE = REPO / "service" / "protocols" / "static" / "samples" / "ankle-boot.png"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("ATTNSERVE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


@pytest.fixture(scope="module")
def page(service):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[dev])")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium on PATH: `make tools` as root installs it (apt-get install chromium)")
    OUT.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=service.base)
        external: list[str] = []
        context.on("request", lambda r: r.url.startswith(service.base) or r.url.startswith(("data:", "blob:"))
                   or external.append(r.url))
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.external_requests = external  # type: ignore[attr-defined]
        yield pg
        browser.close()


def test_translate_streams_and_highlights(page):
    page.goto("/")
    page.wait_for_selector("#models .model")
    assert "translator-en-es" in page.inner_text("#models") and "vit-fashion" in page.inner_text("#models")
    page.fill("#source", "Where is the train station?")
    page.check("#stream")
    page.click("#translate-btn")
    page.wait_for_selector("#heatmap thead span:not(:empty)")  # the done event brings the source tokens
    page.wait_for_function("document.querySelector('#translate-latency').textContent.includes('ms')")
    translation = page.inner_text("#translation")
    assert re.search(r"estaci[oó]n", translation), translation
    sources = page.locator("#heatmap thead span").all_inner_texts()
    assert "station" in sources
    rows = page.locator("#heatmap tbody tr")
    assert rows.count() >= 3
    # Hover the target token for "estación": its row lights up and so does the source token it attended to most.
    row = page.locator("#heatmap tbody tr", has=page.locator("th", has_text=re.compile("estaci")))
    row.first.hover()
    assert "active" in (row.first.get_attribute("class") or "")
    lit = page.locator("#heatmap thead span.lit").all_inner_texts()
    assert lit, "no source token highlighted"
    page.screenshot(path=str(OUT / "demo-translate.png"), full_page=True)
    # The same alignment drawn by the API (Accept: image/png).
    page.click("#alignment-png")
    page.wait_for_function("document.querySelector('#alignment-img').naturalWidth > 0")
    assert page.inner_text("#alignment-caption") == "alignment: decoder layer 2, heads 0-3 mean"
    assert page.is_hidden("#encoder-panel")


def test_translate_layers_heads_and_encoder_attention(page):
    page.goto("/")
    page.wait_for_selector("#layer-boxes input")
    assert page.locator("#layer-boxes input").count() == 3
    page.check("#layer-boxes input[value='0']")  # layers 0 and 2 (the last is ticked)
    page.select_option("#align-head", "1")
    page.check("#encoder")
    page.uncheck("#stream")
    page.fill("#source", "Where is the train station?")
    page.click("#translate-btn")
    page.wait_for_selector("#encoder-panel:not(.hidden)")
    assert page.inner_text("#alignment-caption") == "alignment: decoder layers 0,2, head 1 mean"
    assert "encoder layer 2, heads 0-3 mean" in page.inner_text("#encoder-caption")
    sources = page.locator("#heatmap thead span").all_inner_texts()
    assert page.locator("#encoder-heatmap thead span").all_inner_texts() == sources
    assert page.locator("#encoder-heatmap tbody tr").count() == len(sources)
    assert page.locator("#encoder-heatmap tbody td").count() == len(sources) ** 2
    page.screenshot(path=str(OUT / "demo-translate-encoder.png"), full_page=True)


def test_translate_errors_are_the_apis_messages(page):
    page.goto("/")
    page.fill("#source", "word " * 250)  # over every configured character limit
    page.click("#translate-btn")
    page.wait_for_selector("#translate-error:not(.hidden)")
    text = page.inner_text("#translate-error")
    assert "limit_exceeded" in text and "texts[0]" in text, text


def test_classify_upload_and_sample(page):
    page.goto("/")
    page.set_input_files("#file", str(SAMPLE))
    page.wait_for_selector("#topk li")
    page.wait_for_function("document.querySelector('#overlay').naturalWidth > 0")
    labels = page.locator("#topk .label").all_inner_texts()
    assert len(labels) == 5 and labels[0] == "Ankle boot", labels
    assert "ms" in page.inner_text("#classify-latency")
    page.click("[data-sample=trouser]")
    page.wait_for_function("document.querySelector('#topk .label')?.textContent === 'Trouser'")
    page.wait_for_function("document.querySelector('#overlay').naturalWidth > 0")
    page.screenshot(path=str(OUT / "demo-classify.png"), full_page=True)
    assert page.inner_text("#overlay-caption").startswith("attention rollout")
    # The CLS attention of a chosen layer and head: the image is classified again and the caption names the map.
    page.select_option("#map", "cls")
    page.wait_for_function("document.querySelector('#overlay-caption').textContent.startsWith('CLS attention')")
    assert page.inner_text("#overlay-caption") == "CLS attention, layers 0-5, heads 0-3 mean"  # the default
    page.select_option("#map-layer", "1")
    page.select_option("#map-head", "2")
    page.wait_for_function("document.querySelector('#overlay-caption').textContent.includes('head 2')")
    assert page.inner_text("#overlay-caption") == "CLS attention, layer 1, head 2"
    page.select_option("#map-layer", "")
    page.wait_for_function("document.querySelector('#overlay-caption').textContent.includes('layers 0-5')")
    page.wait_for_function("document.querySelector('#overlay').naturalWidth > 0")
    page.screenshot(path=str(OUT / "demo-classify-cls.png"), full_page=True)


def test_docs_load_offline(page):
    page.goto("/docs")
    page.wait_for_selector(".swagger-ui .opblock")
    assert "/v1/translate" in page.inner_text(".swagger-ui")
    page.screenshot(path=str(OUT / "docs.png"))
    assert page.external_requests == [], page.external_requests

"""The page at / in a real headless browser: Debian's chromium, driven by Playwright."""

from __future__ import annotations

import os
import shutil

import pytest

import retrostore

pytest.importorskip("starlette", reason="retrostore serve needs the serve extra: pip install '.[test,serve]'")


import _serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No browser is ever downloaded: Debian's chromium (apt-get install chromium), started like this.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="chromium is not installed (apt-get install -y chromium)")


def test_typing_a_query_shows_the_hits(built_store, embedder, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    query = "decode base64 encoded data back into bytes"
    with retrostore.open(built_store, embedder=embedder) as st:
        want = st.search(query, k=3)
        meta = st.get_metadata([h.doc_id for h in want])
        info = st.info()
    with _serving.serving(built_store) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(srv.url + "/")
            # the store's facts
            expect(page.locator(".fact-version")).to_contain_text(str(info["version"]))
            expect(page.locator(".fact-chunks")).to_have_text(str(info["chunks"]))
            expect(page.locator(".fact-index")).to_contain_text(info["index"]["factory"])
            # type a query, change k, press Enter
            page.locator("#query").fill(query)
            page.locator("#k").fill("3")
            page.locator("#query").press("Enter")
            hits = page.locator(".hit")
            expect(hits).to_have_count(3)
            expect(page.locator("#status")).to_contain_text(f"3 hits from version {info['version']}")
            for i, (hit, source) in enumerate(zip(want, meta)):
                box = hits.nth(i)
                expect(box.locator(".score")).to_have_text(f"{hit.score:.4f}")
                expect(box.locator(".meta")).to_contain_text(f"document {hit.doc_id} {source['source']}")
                assert box.locator(".text").text_content() == hit.text
                expect(box.locator(".continuation")).to_have_text(hit.continuation_text or "(end of document)")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            # an empty query is refused on the page, not sent
            page.locator("#query").fill("   ")
            page.locator("#go").click()
            expect(page.locator("#error")).to_contain_text("Type something")
            expect(hits).to_have_count(0)  # (helper-51: the previous query's hits stayed)
            expect(page.locator("#status")).to_have_text("")
            # the page names an empty icon inline: browsers ask for no /favicon.ico (a 404 in /metrics)
            assert page.evaluate("document.querySelector('link[rel=icon]').href") == "data:,"
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000

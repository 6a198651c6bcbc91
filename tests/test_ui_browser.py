"""The Prefect UI in a real browser: the caption review form a person fills in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from browser import browser_page
from lorapipe.manifest import read_manifest
from paused_review import start_paused_review

pytestmark = pytest.mark.slow
DOCS = Path(__file__).parent.parent / "docs"


def test_review_form_renders_and_resumes_the_run(prefect_server, tiny_models, demo_photos, tmp_path):
    process, run_id, ws = start_paused_review(prefect_server, tiny_models, demo_photos[0], tmp_path)
    try:
        with browser_page() as page:
            page.goto(f"{prefect_server.url}/runs/flow-run/{run_id}")
            page.get_by_role("button", name="Resume").first.click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("10 captions need a person").wait_for(timeout=30_000)
            assert "portrait_00.jpg" in dialog.inner_text()
            assert "File name (or image id)" in dialog.inner_text()  # field descriptions survive
            page.screenshot(path=tmp_path / "review-form.png")
            if os.environ.get("LORAPIPE_UPDATE_SCREENSHOTS"):
                shutil.copy(tmp_path / "review-form.png", DOCS / "review-form.png")
            dialog.get_by_role("switch").first.click()  # Approve All
            dialog.locator("textarea").last.fill("ui-reviewer")  # Reviewer
            dialog.get_by_role("button", name="Submit").click()
            page.get_by_text("Flow run resumed").first.wait_for(timeout=30_000)
        output, _ = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    records = [r for r in read_manifest(ws / "manifests" / "review.jsonl") if r.kept]
    assert len(records) == 10 and all(r.review == "approved" and r.reviewed_by == "ui-reviewer" for r in records)

"""The dashboard in headless Chromium, driven as an operator drives it.

A pipeline's bundle is installed without its weights: the first study's job fails, and the
dashboard shows the failure with its reason. The weights are put in place and the operator
clicks "retry": the study ends done, and its page shows the timeline of every step. A second
study, sent afterwards, is seen in the live queue and ends done on its own. Screenshots are
kept in test-artifacts/.
"""

from __future__ import annotations

import shutil

from playwright.sync_api import Error as PlaywrightError

from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.peers import start_node, start_orthanc, storescu, wait_for, write_node_config
from tests.support.viewer import browser_page


def state_on_page(page, base_url: str, study_uid: str) -> str:
    """The state the study's page shows; "" when the page's own refresh interrupted the look."""
    try:
        page.goto(f"{base_url}/studies/{study_uid}")
        return page.locator("#study-state").inner_text(timeout=5000)
    except PlaywrightError:
        return ""


def test_an_operator_sees_the_queue_retries_a_failure_and_reads_the_timeline(tmp_path, node_port, artifacts):
    bundle = tmp_path / "ct_body_demo"
    shutil.copytree(DEMO_BUNDLE, bundle, ignore=shutil.ignore_patterns("model.pt", "__pycache__"))
    orthanc = start_orthanc(tmp_path / "orthanc", {"node": ["DICOMNODE", "127.0.0.1", node_port]})
    config = write_node_config(
        tmp_path / "node", node_port,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
        pipelines=[{"name": "ct-demo", "model": str(bundle), "destinations": ["pacs"], "select": {"Modality": "CT"}}],
        stable_after=4, min_free_disk_mb=0,
    )
    node = start_node(config, node_port)
    try:
        node.wait_for_http()
        first, first_paths = small_study(tmp_path / "first", slices=16, seed=7)
        with browser_page(artifacts / "console.log") as page:
            assert storescu("DICOMNODE", node_port, first_paths).returncode == 0
            page.goto(node.http_url + "/")
            assert first.study_uid in page.locator("#queue").inner_text(), "the study is seen while it arrives"
            page.screenshot(path=str(artifacts / "1-receiving.png"), full_page=True)

            wait_for(lambda: page.reload() and first.study_uid in page.locator("#failures").inner_text(), 120,
                     "the failure on the dashboard", 1.0)
            failures = page.locator("#failures").inner_text()
            assert "has neither models/model.pt nor models/model.ts" in failures
            page.screenshot(path=str(artifacts / "2-failed.png"), full_page=True)

            shutil.copy(DEMO_BUNDLE / "models" / "model.pt", bundle / "models" / "model.pt")  # the fix
            page.locator("#failures").get_by_role("button", name="retry").first.click()
            assert "re-queued" in page.locator("#message").inner_text() or "retry done" in page.locator(
                "#message").inner_text()
            wait_for(lambda: state_on_page(page, node.http_url, first.study_uid) == "done", 240, "the retried study done", 2.0)
            timeline = page.locator("#timeline").inner_text()
            for step in ("first instance received", "complete", "started by", "failed", "re-queued by an operator",
                         "timings: volume", "preprocess", "network", "postprocess", "encode", "write", "delivered SEG to pacs",
                         "delivered SR to pacs"):
                assert step in timeline, step
            assert "anonymous" in timeline and "127.0.0.1" in timeline, "the retry names who asked, from where"
            page.screenshot(path=str(artifacts / "3-timeline.png"), full_page=True)

            second, second_paths = small_study(tmp_path / "second", slices=16, seed=8)
            assert storescu("DICOMNODE", node_port, second_paths).returncode == 0
            page.goto(node.http_url + "/")
            assert second.study_uid in page.locator("#queue").inner_text()
            wait_for(lambda: state_on_page(page, node.http_url, second.study_uid) == "done", 240, "the second study done", 2.0)

            page.goto(node.http_url + "/")
            chart = page.locator("#pipelines svg.chart").first
            assert chart.is_visible()
            done_bars = page.locator("#pipelines svg.chart rect.done")
            heights = [float(done_bars.nth(i).get_attribute("height")) for i in range(done_bars.count())]
            assert sum(height > 0 for height in heights) >= 1, "the chart draws this hour's jobs"
            assert "Failures" in page.content() and "no failures" in page.locator("#failures").inner_text()
            page.screenshot(path=str(artifacts / "4-overview.png"), full_page=True)
            chart.screenshot(path=str(artifacts / "5-chart.png"))
    finally:
        node.stop()
        orthanc.stop()

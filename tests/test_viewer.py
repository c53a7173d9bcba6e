"""The node's SEG in a real viewer: OHIF in headless Chromium, reading Orthanc over DICOMweb.

A study goes through the node to Orthanc as in the reading room; OHIF opens it, the SEG is
loaded the way a radiologist loads it (double-click on its series, confirm), and the test reads
the screen: the coloured overlay must cover the body on the displayed CT slice, and the bone
segment the bone, and the segmentation panel must list the model's segments. Screenshots and
the browser's console are kept in test-artifacts/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage
from PIL import Image

from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.peers import start_node, start_orthanc, storescu, wait_for, write_node_config
from tests.support.viewer import ViewerServer, browser_page

# A screen pixel is "coloured" (overlay, not grey CT) when its channels differ by more than this.
CHROMA = 40


def chroma(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(axis=-1) - rgb.min(axis=-1)


def screenshot(page, path: Path) -> np.ndarray:
    page.locator("canvas.cornerstone-canvas").first.screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def patient_on_screen(bright: np.ndarray) -> np.ndarray:
    """The patient among what is bright on screen: thin things around it (the table's shells, a
    blanket, tubes) opened away, the parts of at least 2 % of the largest (trunk and limbs) kept
    and filled (lungs and bowel gas are dark, and body)."""
    opened = ndimage.binary_opening(bright, iterations=4)
    parts, _ = ndimage.label(opened)
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(np.isin(parts, np.flatnonzero(sizes > 0.02 * sizes.max())))


def test_ohif_displays_the_seg_on_the_source_images(tmp_path, node_port, artifacts):
    orthanc = start_orthanc(tmp_path / "orthanc", {"node": ["DICOMNODE", "127.0.0.1", node_port]}, dicomweb=True)
    config = write_node_config(
        tmp_path / "node",
        node_port,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
        pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "destinations": ["pacs"],
                    "select": {"Modality": "CT"}}],
        stable_after=1,
    )
    node = start_node(config, node_port)
    viewer = None
    try:
        info, paths = small_study(tmp_path / "study", slices=40)
        study_id = orthanc.upload(paths)
        assert storescu(node.ae_title, node.port, paths).returncode == 0

        def results_in_pacs():
            modalities = {s["MainDicomTags"].get("Modality") for s in orthanc.get(f"/studies/{study_id}/series")}
            return {"SEG", "SR"} <= modalities

        wait_for(results_in_pacs, 300, "SEG and SR in Orthanc", interval=1.0)
        viewer = ViewerServer(orthanc)
        with browser_page(artifacts / "browser-console.log") as page:
            page.goto(f"{viewer.url}/viewer?StudyInstanceUIDs={info.study_uid}")
            page.get_by_text("Skip all").click(timeout=120_000)  # OHIF's first-visit tour
            page.wait_for_timeout(1000)
            before = screenshot(page, artifacts / "1-ct.png")

            page.get_by_text("SEG ct-demo").first.dblclick(timeout=60_000)
            page.get_by_role("button", name="Yes").click(timeout=60_000)  # "open this Segmentation?"
            page.wait_for_timeout(3000)
            after = screenshot(page, artifacts / "2-ct-with-seg.png")

            page.locator('[data-cy="panelSegmentation-btn"]').click()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(artifacts / "3-segmentation-panel.png"))
            segment_labels = {label for label in ("body", "bone") if page.get_by_text(label, exact=True).count()}
    finally:
        if viewer is not None:
            viewer.stop()
        node.stop()
        orthanc.stop()
        (artifacts / "node.log").write_text(node.log())

    # The CT alone is grey; the SEG adds colour where the body is, and green where the bone is.
    grey = before.mean(axis=-1)
    body_on_screen = patient_on_screen(grey > 20)
    bone_on_screen = (grey > 200) & body_on_screen  # a cable's metal core outside is not bone
    coloured = chroma(after) > CHROMA
    assert (chroma(before) > CHROMA).sum() * 10 < coloured.sum(), "no overlay appeared"
    assert iou(coloured, body_on_screen) > 0.8, "the overlay does not lie on the body"
    bone_overlay = after[..., 1] > after[..., 0] + CHROMA
    # 0.7 of it: the tip of a spinous process, two source pixels wide, is at the model's limit
    assert (bone_overlay & bone_on_screen).sum() > 0.7 * bone_on_screen.sum(), "the bone segment misses the bone"
    assert segment_labels == {"body", "bone"}, "the segmentation panel does not list the model's segments"

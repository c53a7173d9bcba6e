"""The demo model's quality: per held-out phantom family, and on a real CT through the node.

The committed weights are what `make run` serves; these tests fail when they segment a family
of phantoms they never saw, or the real abdominal CT in ``../shared/real-ct``, worse than the
bundle's README says.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from dicom_node.compute.bundle import Bundle
from dicom_node.compute.frames import read_frames
from dicom_node.compute.volume import load_volume
from tests.support.ct_study import DEMO_BUNDLE
from tests.support.peers import ROOT

sys.path.insert(0, str(DEMO_BUNDLE))
from scripts.phantoms import Phantom
from scripts.quality import MINIMUM_DICE, format_table, quality_table
from scripts.train import bundle_inference, bundle_parser, load_network, ras_affine

REAL_CT = ROOT.parent / "shared" / "real-ct" / "siemens-abdomen"
# On the real CT, measured on the committed weights (the bundle's README gives the numbers).
REAL_CT_MINIMUM = {"body": 0.95, "bone": 0.75}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * float(np.sum(pred & truth)) / max(int(pred.sum()) + int(truth.sum()), 1)


@pytest.fixture(scope="module")
def trained():
    parser = bundle_parser()
    network = load_network(parser)
    network.load_state_dict(torch.load(DEMO_BUNDLE / "models" / "model.pt", weights_only=True))
    return parser, network.eval()


def test_every_held_out_family_scores_at_least_the_minimum(trained):
    parser, network = trained
    table = quality_table(lambda hu, spacing, origin: bundle_inference(
        parser, network, hu, ras_affine(Phantom(hu, hu, hu, spacing, origin))))
    print("\n" + format_table(table))
    for family, scores in table.items():
        for label, score in scores.items():
            assert score >= MINIMUM_DICE[label], f"{family}: Dice of {label} is {score:.3f}"


def patient_outline(hu: np.ndarray) -> np.ndarray:
    """The patient by Hounsfield units alone: tissue above -500 HU, thin structures (table
    shells, blankets, cables) opened away, components of at least 2 % of the largest (trunk and
    arms), holes filled slice by slice (lungs, bowel gas)."""
    opened = ndimage.binary_opening(hu > -500, structure=np.ones((3, 3, 1)), iterations=2)
    components, _ = ndimage.label(opened)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    patient = np.isin(components, np.flatnonzero(sizes > 0.02 * sizes.max()))
    return np.stack([ndimage.binary_fill_holes(patient[:, :, k]) for k in range(hu.shape[2])], axis=-1)


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="the shared real CT is not beside the repository")
def test_real_abdominal_ct_through_the_node():
    volume = load_volume(read_frames(sorted(REAL_CT.iterdir())))
    labels = Bundle(DEMO_BUNDLE, torch.device("cpu")).predict(volume)
    patient = patient_outline(volume.array)
    bone = patient & (volume.array > 300)
    scores = {"body": dice(labels == 1, patient & ~bone), "bone": dice(labels == 2, bone),
              "patient (body and bone)": dice(labels > 0, patient)}
    print("\nreal abdominal CT:", ", ".join(f"{name} {score:.3f}" for name, score in scores.items()))
    for name, minimum in REAL_CT_MINIMUM.items():
        assert scores[name] >= minimum, f"real CT: Dice of {name} is {scores[name]:.3f}"

"""`dicom-node bundle check` says in words why a bundle cannot run here, or that it is ready.

The broken bundles are written by the tests in the Model Zoo's layout, each broken the way Zoo
bundles made for an older MONAI break: a network argument that MONAI removed since, a
package the bundle's own scripts import, NumPy functions that NumPy 2 removed, weights that do
not fit the network. The YAML bundle of ../shared/monai-bundles is checked as it is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import monai
import numpy

from dicom_node.compute.bundle_check import check_bundle
from tests.compute.test_bundle import zoo_bundle
from tests.support.peers import ROOT

DEMO = ROOT / "models" / "ct_body_demo"


def demo_copy(folder: Path, monai_version: str = "1.3.0") -> Path:
    """The demo bundle as a Zoo bundle made with an older MONAI would describe itself."""
    bundle = folder / "bundle"
    shutil.copytree(DEMO, bundle, ignore=shutil.ignore_patterns("__pycache__"))
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata.update(monai_version=monai_version, numpy_version="1.22.2")
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    return bundle


def configure(bundle: Path, change) -> None:
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_the_demo_bundle_is_ready_with_its_labels_and_codes():
    report = check_bundle(DEMO, "cpu")
    assert report.ready, report.problems
    assert report.labels == ["1 body: SCT 38266002 Entire body", "2 bone: SCT 272673000 Bone"]


def test_a_network_argument_monai_removed_is_named_with_the_versions(tmp_path):
    bundle = demo_copy(tmp_path)

    def old_swin_unetr(config):
        config["network_def"] = {"_target_": "SwinUNETR", "img_size": [96, 96, 96], "in_channels": 1,
                                 "out_channels": 3, "feature_size": 12}

    configure(bundle, old_swin_unetr)
    report = check_bundle(bundle, "cpu")
    assert not report.ready
    assert report.problems == [(f"`SwinUNETR` no longer takes `img_size` (the bundle was made with MONAI 1.3.0, "
                               f"the node runs {monai.__version__})")]
    assert "made with monai 1.3.0" in report.render() and "NOT ready" in report.render()


def test_a_package_the_bundle_imports_and_the_node_lacks_is_named(tmp_path):
    bundle = demo_copy(tmp_path)
    (bundle / "scripts" / "net.py").write_text(
        "import itk_elastix_registration_toolkit\n\n\ndef network(**kwargs):\n    raise AssertionError\n")
    configure(bundle, lambda config: config.update(network_def={"_target_": "scripts.net.network"}))
    report = check_bundle(bundle, "cpu")
    assert report.problems == [("package `itk_elastix_registration_toolkit` is missing: the bundle imports it, the "
                               "node's environment does not have it")]


def test_numpy_functions_numpy_2_removed_are_named(tmp_path):
    bundle = demo_copy(tmp_path)
    (bundle / "scripts" / "old_numpy.py").write_text(
        "import numpy as np\n\n\nclass AsFloat:\n    def __call__(self, data):\n"
        "        data['image'] = data['image'].astype(np.float)\n        return data\n")

    def with_old_transform(config):
        config["preprocessing"]["transforms"].insert(1, {"_target_": "scripts.old_numpy.AsFloat"})

    configure(bundle, with_old_transform)
    report = check_bundle(bundle, "cpu")
    assert report.problems == [
        ("running a small synthetic volume through it failed: the bundle's code uses `numpy.float`, which NumPy "
        f"{numpy.__version__} no longer has (NumPy 2 removed it; the bundle names NumPy 1.22.2)")]


def test_weights_that_do_not_fit_the_network_are_counted(tmp_path):
    bundle = demo_copy(tmp_path)
    configure(bundle, lambda config: config["network_def"].update(channels=[8, 16, 32, 128]))
    report = check_bundle(bundle, "cpu")
    (problem,) = report.problems
    assert problem.startswith("the weights in models/model.pt do not fit the network: ")
    assert "of another shape (first: " in problem


def test_the_yaml_zoo_bundle_is_ready(tmp_path):
    report = check_bundle(zoo_bundle("pediatric_abdominal_ct_segmentation", tmp_path), "cpu")
    assert report.ready, report.problems
    assert [label.split(":")[0] for label in report.labels] == ["1 liver", "2 spleen", "3 pancreas"]
    assert all("no known code" not in label for label in report.labels)


def test_the_command_exits_non_zero_when_the_bundle_is_not_ready(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "bundle", "check", str(tmp_path / "empty"),
                             "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 1
    assert "has no configs/metadata.json: is it a bundle directory?" in result.stdout
    ready = subprocess.run([sys.executable, "-m", "dicom_node.cli", "bundle", "check", str(DEMO)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert ready.returncode == 0 and ": ready" in ready.stdout, ready.stdout + ready.stderr


def test_what_monai_says_of_a_missing_optional_package_is_told_as_a_missing_package():
    from dicom_node.compute.bundle_diagnosis import RUNTIME, diagnose

    class OptionalImportError(ImportError):
        """As MONAI's monai.utils.module raises it."""

    einops = OptionalImportError("from einops import rearrange (No module named 'einops').\n\nFor details ...")
    assert diagnose(einops, {"monai": "1.3.0"}, RUNTIME) == (
        "package `einops` is missing: MONAI needs it for this bundle, its runtime does not have it")
    assert diagnose(RuntimeError("Skimage.measure required."), {}) == (
        "package `skimage` is missing: MONAI needs it for this bundle (\"Skimage.measure required.\"), the node's "
        "environment does not have it")

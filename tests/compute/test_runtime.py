"""A bundle made for an older MONAI runs in its own runtime, as the node would run it in its own.

The runtime (MONAI 1.3.0 with the NumPy of its line, the node's PyTorch) is prepared once per
run by the ``old_monai`` fixture. The Zoo's pediatric bundle (YAML) names the same versions,
so it runs in that runtime too: its label map there is compared voxel by voxel with the node's
own on the same CT, which would show any axis, order or offset lost on the way through the pipe.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from dicom_node.compute.bundle import Bundle
from dicom_node.compute.frames import read_frames
from dicom_node.compute.runtime import client, wire
from dicom_node.compute.runtime.client import RuntimeBundle, RuntimeExited
from dicom_node.compute.volume import load_volume
from dicom_node.compute.worker import classify_failure
from tests.compute.test_bundle import zoo_bundle
from tests.support.ct_study import StudyInfo, ct_series, make_phantom, write_series
from tests.support.peers import ROOT, write_node_config


@pytest.fixture(scope="module")
def ct_volume(tmp_path_factory):
    """A small CT, longer along one axis than the others so that a lost transposition shows."""
    phantom = make_phantom((40, 28, 12), (4.0, 4.0, 5.0), seed=21)
    return load_volume(read_frames(write_series(ct_series(phantom, StudyInfo(), 5, "runtime input"),
                                                tmp_path_factory.mktemp("ct"))))


def node_config_with(old_monai, folder):
    config = write_node_config(folder, 11112, destinations=[], pipelines=[])
    old_monai.use_in(folder / "data")
    return config


def test_bundle_check_in_its_runtime_says_ready_with_the_runtimes_versions_and_the_labels(tmp_path, old_monai):
    config = node_config_with(old_monai, tmp_path / "node")
    command = [sys.executable, "-m", "dicom_node.cli", "bundle", "check", str(old_monai.bundle), "--device", "cpu"]
    in_runtime = subprocess.run([*command, "--runtime", "bundle", "--config", str(config)], capture_output=True,
                                text=True, cwd=ROOT, timeout=300, check=False)
    assert in_runtime.returncode == 0, in_runtime.stdout + in_runtime.stderr
    assert f"runtime {old_monai.runtime.name} runs monai 1.3.0" in in_runtime.stdout
    assert "label 1 spleen: SCT 78961009 Spleen" in in_runtime.stdout
    assert "label 2 liver: SCT 10200004 Liver" in in_runtime.stdout


def test_the_yaml_zoo_bundle_gives_the_same_labels_in_its_runtime_as_in_the_node(tmp_path, old_monai, ct_volume):
    bundle_dir = zoo_bundle("pediatric_abdominal_ct_segmentation", tmp_path)
    in_node = Bundle(bundle_dir, torch.device("cpu")).predict(ct_volume)
    in_runtime = RuntimeBundle(bundle_dir, "cpu", old_monai.runtime)
    try:
        assert in_runtime.versions["monai"] == "1.3.0" and in_runtime.versions["numpy"].startswith("1.")
        labels = in_runtime.predict(ct_volume)
    finally:
        in_runtime.close()
    assert labels.shape == in_node.shape == ct_volume.array.shape
    assert set(np.unique(in_node)) - {0}, "random weights that write no label prove nothing"
    agreement = float(np.mean(labels == in_node))
    assert agreement > 0.995, f"the two environments agree on {agreement:.4f} of the voxels"
    assert {"preprocess", "network", "postprocess", "runtime_pipe"} <= in_runtime.timings.keys()


def test_a_runner_that_dies_is_told_as_such_and_the_next_volume_starts_a_new_one(old_monai, ct_volume,
                                                                                  monkeypatch):
    bundle = RuntimeBundle(old_monai.bundle, "cpu", old_monai.runtime)
    try:
        first = bundle._process

        def send_then_kill(stream, header, array=None):  # the runner dies with the volume in hand
            wire.send(stream, header, array)
            first.kill()
            first.wait()
            monkeypatch.setattr(client, "send", wire.send)

        monkeypatch.setattr(client, "send", send_then_kill)
        with pytest.raises(RuntimeExited, match=r"ended \(exit code -9\) while predicting") as ended:
            bundle.predict(ct_volume)
        reason, permanent = classify_failure(ended.value, 1800)
        assert not permanent and "ended (exit code -9)" in reason  # retried: a new runner may succeed
        labels = bundle.predict(ct_volume)
        assert bundle._process is not first and labels.shape == ct_volume.array.shape
        assert set(np.unique(labels)) <= {0, 1, 2}
    finally:
        bundle.close()


def test_runtime_auto_takes_the_node_where_the_check_passes_there_and_the_bundles_runtime_elsewhere(tmp_path,
                                                                                                   old_monai):
    from dicom_node.compute.worker import Worker
    from dicom_node.config import load_config
    from dicom_node.state import db
    from tests.support.ct_study import DEMO_BUNDLE

    config = load_config(write_node_config(tmp_path / "node", 11112, destinations=[], min_free_disk_mb=0, pipelines=[
        {"name": "demo", "model": str(DEMO_BUNDLE), "runtime": "auto", "select": {"Modality": "CT"}},
        {"name": "old", "model": str(old_monai.bundle), "runtime": "auto", "device": "cpu",
         "select": {"Modality": "CT"}},
    ]))
    old_monai.use_in(tmp_path / "node" / "data")
    worker = Worker(config, db.connect(config.database_url))
    try:
        worker.warm_up()
        assert worker.runs_in == {"demo": "node", "old": "bundle"} and not worker.disabled
        assert isinstance(worker.bundles["demo"], Bundle) and isinstance(worker.bundles["old"], RuntimeBundle)
    finally:
        for name in list(worker.bundles):
            worker._unload(name)

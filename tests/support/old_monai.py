"""A bundle that instantiates only with an older MONAI, and the runtime prepared for it.

The bundle is written as the Model Zoo writes one made with MONAI 1.3.0: a SwinUNETR that takes
``img_size`` (MONAI removed the argument since), LoadImaged and SaveImaged around the transforms,
and the metadata the Zoo's pediatric abdominal CT bundle names (MONAI 1.3.0, NumPy 1.22.2,
its optional packages), so that the two bundles need the same runtime and share it. Its weights
are random, saved by that MONAI inside the runtime.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dicom_node.compute.runtime.prepare import prepare, python_of, runtime_for

LABELS = {"0": "background", "1": "spleen", "2": "liver"}
MADE_WITH = {"monai_version": "1.3.0", "pytorch_version": "2.1.0", "numpy_version": "1.22.2",
             "optional_packages_version": {"fire": "0.4.0", "nibabel": "4.0.1", "pytorch-ignite": "0.4.11"}}

METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
    "version": "0.3.1",
    "changelog": {"0.3.1": "made with MONAI 1.3.0"},
    **MADE_WITH,
    "name": "Spleen and liver CT segmentation (older MONAI)",
    "task": "Spleen and liver segmentation on CT",
    "description": "A SwinUNETR in the Model Zoo's layout, as made with MONAI 1.3.0; random weights.",
    "authors": "dicom-node tests",
    "copyright": "Copyright (c) dicom-node contributors",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                             "spatial_shape": [64, 64, 64], "dtype": "float32", "value_range": [-1000, 1000],
                             "is_patch_data": True, "channel_def": {"0": "image"}}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                             "spatial_shape": [64, 64, 64], "dtype": "float32", "value_range": [0, 1, 2],
                             "is_patch_data": True, "channel_def": LABELS}},
    },
}

INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {"_target_": "SwinUNETR", "img_size": [64, 64, 64], "in_channels": 1, "out_channels": 3,
                    "feature_size": 12, "use_checkpoint": False},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [3.0, 3.0, 3.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1,
         "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                   "num_workers": 4},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 64], "sw_batch_size": 1, "overlap": 0.25},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "separate_folder": False},
    ]},
    "initialize": ["$monai.utils.set_determinism(seed=123)"],
    "run": ["$@evaluator.run()"],
}

SAVE_WEIGHTS = """
import sys, torch
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config(sys.argv[1] + "/configs/inference.json")
torch.manual_seed(0)
torch.save(parser.get_parsed_content("network_def").state_dict(), sys.argv[1] + "/models/model.pt")
"""


@dataclass(frozen=True)
class OldMonai:
    """The prepared runtimes folder, and a finished bundle to copy from."""

    runtimes: Path
    bundle: Path

    @property
    def runtime(self) -> Path:
        return runtime_for(self.bundle, self.runtimes)

    def bundle_copy(self, folder: Path) -> Path:
        copy = folder / "old-monai-bundle"
        shutil.copytree(self.bundle, copy)
        return copy

    def use_in(self, data_dir: Path) -> None:
        """Let a node whose data_dir this is find the runtime, as if it had prepared it."""
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "runtimes").symlink_to(self.runtimes, target_is_directory=True)


def write_bundle(folder: Path) -> Path:
    bundle = folder / "spleen_liver_ct_old_monai"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=4))
    (bundle / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=4))
    return bundle


def prepared_old_monai(folder: Path) -> OldMonai:
    """Write the bundle, prepare its runtime (a few minutes: PyTorch is unpacked into it), and
    save its weights with the runtime's MONAI."""
    bundle = write_bundle(folder)
    lines: list[str] = []
    runtime = prepare(bundle, folder / "runtimes", lines.append)
    subprocess.run([str(python_of(runtime)), "-I", "-c", SAVE_WEIGHTS, str(bundle)], check=True, timeout=300)
    return OldMonai(folder / "runtimes", bundle)

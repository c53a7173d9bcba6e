"""Why a bundle does not run, in words: its layout, a trial on a small volume, Python's errors.

What goes wrong with a bundle made for another MONAI is told with the versions, rather than as
the Python error at the bottom of a chain of wrappers. This module runs in the node's worker and
in a bundle's runtime alike (`dicom_node.compute.runtime`), so it needs NumPy and the bundle
module only: no DICOM, no database.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from dicom_node.bundle_info import BundleInfo
from dicom_node.compute.bundle import DiagnosedError
from dicom_node.compute.runtime.spec import SpecError

SYNTHETIC_SHAPE = (48, 48, 24)  # a small body: enough for every window and crop to run once
SYNTHETIC_SPACING_MM = (4.0, 4.0, 5.0)


@dataclass(frozen=True)
class Environment:
    """Where the bundle was tried, as the messages name it."""

    runs: str  # "the node runs" 1.6.1
    lacks: str  # package x is missing: the bundle imports it, ... "does not have it"


NODE = Environment("the node runs", "the node's environment does not have it")
RUNTIME = Environment("its runtime runs", "its runtime does not have it")


class Predicting(Protocol):
    """A loaded bundle, in the node's process (`Bundle`) or in a runtime (`RuntimeBundle`)."""

    bundle_dir: Path
    info: BundleInfo

    def predict_array(self, array: np.ndarray, affine_ras: np.ndarray, name: str) -> np.ndarray: ...


def installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def made_with(bundle_dir: Path) -> dict[str, str]:
    """The versions the bundle's metadata names (MONAI, PyTorch, NumPy), those it names."""
    try:
        metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}
    named = {"monai": metadata.get("monai_version"), "torch": metadata.get("pytorch_version"),
             "numpy": metadata.get("numpy_version")}
    return {name: str(version) for name, version in named.items() if version}


def layout_problems(bundle_dir: Path) -> list[str]:
    """What the Model Zoo layout needs and the directory lacks, before anything is loaded."""
    if not bundle_dir.is_dir():
        return [f"{bundle_dir} is not a directory"]
    problems = []
    if not (bundle_dir / "configs" / "metadata.json").exists():
        problems.append(f"{bundle_dir} has no configs/metadata.json: is it a bundle directory?")
    if not any((bundle_dir / "configs" / name).exists() for name in ("inference.json", "inference.yaml",
                                                                      "inference.yml")):
        problems.append(f"{bundle_dir} has no configs/inference.json or .yaml")
    if not any((bundle_dir / "models" / name).exists() for name in ("model.pt", "model.ts")):
        problems.append(f"{bundle_dir} has neither models/model.pt nor models/model.ts")
    return problems


def check_loaded(bundle: Predicting) -> list[str]:
    """What is wrong with a loaded bundle, found by running a small synthetic volume through
    it (preprocessing, inferer, network, postprocessing); empty when nothing is."""
    made = made_with(bundle.bundle_dir)
    try:
        labels = bundle.predict_array(*synthetic_volume(), "synthetic")
    except Exception as error:  # noqa: BLE001 - every failure becomes the check's answer
        return ["running a small synthetic volume through it failed: " + diagnose(error, made)]
    problems = []
    if not bundle.info.labels:
        problems.append("configs/metadata.json names no output labels (network_data_format.outputs)")
    unexpected = sorted(set(np.unique(labels).tolist()) - set(bundle.info.labels) - {0})
    if unexpected:
        problems.append(f"it wrote label values {unexpected} that configs/metadata.json does not name")
    return problems


def synthetic_volume() -> tuple[np.ndarray, np.ndarray]:
    """A body of soft tissue with a bone in it, in air: Hounsfield units, as a CT gives them,
    laid out frame by frame like the node's volumes; with its RAS affine."""
    i, j, _ = np.meshgrid(*(np.linspace(-1, 1, n) for n in SYNTHETIC_SHAPE), indexing="ij")
    array = np.full(SYNTHETIC_SHAPE, -1000.0, dtype=np.float32)
    array[(i / 0.8) ** 2 + (j / 0.6) ** 2 <= 1] = 40.0
    array[(i / 0.15) ** 2 + ((j + 0.3) / 0.15) ** 2 <= 1] = 700.0
    return np.asfortranarray(array), np.diag([*SYNTHETIC_SPACING_MM, 1.0])


# What Python says, and what an operator needs to read instead.
_UNEXPECTED_ARGUMENT = re.compile(r"(?:(\w+)\.__init__\(\) )?got an unexpected keyword argument '(\w+)'")
_COMPONENT = re.compile(r"Failed to instantiate component '([\w.]+)'")
_NUMPY_ATTRIBUTE = re.compile(r"module 'numpy' has no attribute '(\w+)'")
_MONAI_REQUIRES = re.compile(r"\b([A-Za-z]\w*)(?:\.\w+)* required\.")  # "Skimage.measure required."
_NO_MODULE = re.compile(r"No module named '(\w+)")  # in MONAI's OptionalImportError, among others


def diagnose(error: BaseException, versions: dict[str, str], where: Environment = NODE) -> str:
    """The failure in words: what is missing or changed, and the versions that explain it."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(cause)
    for link in chain:
        if isinstance(link, (DiagnosedError, SpecError)):  # already in words
            return str(link)
    text = " ".join(str(link) for link in chain)
    made = versions.get("monai")
    versions_said = (f" (the bundle was made with MONAI {made}, {where.runs} {installed('monai')})" if made
                     else f" ({where.runs} MONAI {installed('monai')})")
    for link in chain:
        if isinstance(link, ModuleNotFoundError) and link.name:
            return f"package `{link.name.split('.')[0]}` is missing: the bundle imports it, {where.lacks}"
    if match := _NO_MODULE.search(text):
        return f"package `{match.group(1)}` is missing: MONAI needs it for this bundle, {where.lacks}"
    if match := _MONAI_REQUIRES.search(text):
        return f"package `{match.group(1).lower()}` is missing: MONAI needs it for this bundle " \
               f"(\"{match.group(0)}\"), {where.lacks}"
    if match := _UNEXPECTED_ARGUMENT.search(text):
        component = _COMPONENT.search(text)
        name = match.group(1) or (component.group(1).rsplit(".", 1)[-1] if component else None)
        what = f"`{name}`" if name else "a component of the configuration"
        return f"{what} no longer takes `{match.group(2)}`{versions_said}"
    if match := _NUMPY_ATTRIBUTE.search(text):
        return f"the bundle's code uses `numpy.{match.group(1)}`, which NumPy {installed('numpy')} no longer has " \
               f"(NumPy 2 removed it; the bundle names NumPy {versions.get('numpy', 'of its time')})"
    if "Error(s) in loading state_dict" in text:
        missing = re.search(r"Missing key\(s\) in state_dict: (.*?)(?:\.\s|$)", text)
        unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*?)(?:\.\s|$)", text)
        shapes = re.findall(r"size mismatch for ([\w.]+)", text)
        parts = []
        if missing:
            parts.append(f"{missing.group(1).count(',') + 1} missing")
        if unexpected:
            parts.append(f"{unexpected.group(1).count(',') + 1} unexpected")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (first: {shapes[0]})")
        return "the weights in models/model.pt do not fit the network: " + ", ".join(parts or ["see the worker log"])
    last = chain[-1]
    return f"{type(last).__name__}: {str(last)[:400]}{versions_said}"

"""Is a bundle ready to run here? Load all the node will use of it and run a small volume.

`dicom-node bundle check DIR` prints the answer; each worker asks it of its pipelines' bundles
at start-up, and a pipeline whose bundle fails is disabled with the reason (`state.pipelines`)
while the others run. What goes wrong with a bundle made for another MONAI is told in words,
with the versions, rather than as the Python error at the bottom of a chain of wrappers.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicom_node.compute.bundle import Bundle, choose_device
from dicom_node.compute.volume import Volume
from dicom_node.results.codes import bundle_overrides, codes_for_label

SYNTHETIC_SHAPE = (48, 48, 24)  # a small body: enough for every window and crop to run once
SYNTHETIC_SPACING_MM = (4.0, 4.0, 5.0)


@dataclass
class Report:
    """The answer of a check: ready, or the problems in words; the labels and codes it will write."""

    bundle_dir: Path
    device: str
    problems: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # "1 spleen: SCT 78961009 Spleen"
    made_with: dict[str, str] = field(default_factory=dict)  # what metadata.json names
    seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"bundle {self.bundle_dir} on {self.device}: " + ("ready" if self.ready else "NOT ready")]
        if self.made_with:
            lines.append("  made with " + ", ".join(f"{name} {version}" for name, version in self.made_with.items())
                         + "; the node runs " + ", ".join(f"{name} {installed(name)}" for name in self.made_with))
        lines += [f"  problem: {problem}" for problem in self.problems]
        lines += [f"  label {label}" for label in self.labels]
        if self.ready:
            lines.append(f"  a synthetic volume went through it in {self.seconds:.1f} s")
        return "\n".join(lines)


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


def check_bundle(bundle_dir: Path, device: str = "auto") -> Report:
    report = Report(bundle_dir, str(choose_device(device)), made_with=made_with(bundle_dir))
    report.problems += layout_problems(bundle_dir)
    if report.problems:
        return report
    started = time.perf_counter()
    try:
        bundle = Bundle(bundle_dir, choose_device(device))
    except Exception as error:  # noqa: BLE001 - every failure becomes the check's answer
        report.problems.append(diagnose(error, report.made_with))
        return report
    report.problems += check_loaded(bundle)
    report.seconds = time.perf_counter() - started
    overrides = bundle_overrides(bundle_dir)
    for value, name in sorted(bundle.info.labels.items()):
        codes = codes_for_label(name, overrides)
        code = codes.property_type
        known = "" if codes.known else " (no known code: a generic one is written)"
        report.labels.append(f"{value} {name}: {code.scheme_designator} {code.value} {code.meaning}{known}")
    return report


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


def check_loaded(bundle: Bundle) -> list[str]:
    """What is wrong with a loaded bundle, found by running a small synthetic volume through
    it (preprocessing, inferer, network, postprocessing); empty when nothing is."""
    made = made_with(bundle.bundle_dir)
    try:
        labels = bundle.predict(synthetic_volume())
    except Exception as error:  # noqa: BLE001 - every failure becomes the check's answer
        return ["running a small synthetic volume through it failed: " + diagnose(error, made)]
    problems = []
    if not bundle.info.labels:
        problems.append("configs/metadata.json names no output labels (network_data_format.outputs)")
    unexpected = sorted(set(np.unique(labels).tolist()) - set(bundle.info.labels) - {0})
    if unexpected:
        problems.append(f"it wrote label values {unexpected} that configs/metadata.json does not name")
    return problems


def synthetic_volume() -> Volume:
    """A body of soft tissue with a bone in it, in air: Hounsfield units, as a CT gives them."""
    i, j, _ = np.meshgrid(*(np.linspace(-1, 1, n) for n in SYNTHETIC_SHAPE), indexing="ij")
    array = np.full(SYNTHETIC_SHAPE, -1000.0, dtype=np.float32)
    array[(i / 0.8) ** 2 + (j / 0.6) ** 2 <= 1] = 40.0
    array[(i / 0.15) ** 2 + ((j + 0.3) / 0.15) ** 2 <= 1] = 700.0
    affine = np.diag([*SYNTHETIC_SPACING_MM, 1.0])
    return Volume(np.asfortranarray(array), affine, frames=[])


# What Python says, and what an operator needs to read instead.
_UNEXPECTED_ARGUMENT = re.compile(r"(?:(\w+)\.__init__\(\) )?got an unexpected keyword argument '(\w+)'")
_COMPONENT = re.compile(r"Failed to instantiate component '([\w.]+)'")
_NUMPY_ATTRIBUTE = re.compile(r"module 'numpy' has no attribute '(\w+)'")


def diagnose(error: BaseException, versions: dict[str, str]) -> str:
    """The failure in words: what is missing or changed, and the versions that explain it."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(cause)
    text = " ".join(str(link) for link in chain)
    made = versions.get("monai")
    versions_said = (f" (the bundle was made with MONAI {made}, the node runs {installed('monai')})" if made
                     else f" (the node runs MONAI {installed('monai')})")
    for link in chain:
        if isinstance(link, ModuleNotFoundError) and link.name:
            return f"package `{link.name.split('.')[0]}` is missing: the bundle imports it, the node's environment " \
                   "does not have it"
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


"""Is a bundle ready to run here? Load all the node will use of it and run a small volume.

`dicom-node bundle check DIR` prints the answer, for the node's environment or for the
bundle's prepared runtime (`dicom_node.compute.runtime`); each worker asks the same of its
pipelines' bundles at start-up, and a pipeline whose bundle fails is disabled with the reason
(`state.pipeline_checks`) while the others run. The failures are told in words by
`bundle_diagnosis`; this module adds what the results will say: the labels and their codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.compute.bundle import Bundle, choose_device
from dicom_node.compute.bundle_diagnosis import (
    Predicting,
    check_loaded,
    diagnose,
    installed,
    layout_problems,
    made_with,
)
from dicom_node.compute.runtime.client import RuntimeBundle
from dicom_node.compute.runtime.prepare import runtime_for
from dicom_node.results.codes import bundle_overrides, codes_for_label


@dataclass
class Report:
    """The answer of a check: ready, or the problems in words; the labels and codes it will write."""

    bundle_dir: Path
    device: str
    problems: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # "1 spleen: SCT 78961009 Spleen"
    made_with: dict[str, str] = field(default_factory=dict)  # what metadata.json names
    runs: dict[str, str] = field(default_factory=dict)  # what it was tried with
    where: str = "the node"  # or "runtime monai-1.3.0-..."
    seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"bundle {self.bundle_dir} on {self.device}: " + ("ready" if self.ready else "NOT ready")]
        if self.made_with:
            lines.append("  made with " + ", ".join(f"{name} {version}" for name, version in self.made_with.items())
                         + f"; {self.where} runs " + ", ".join(f"{name} {self.runs.get(name, '?')}"
                                                              for name in self.made_with))
        lines += [f"  problem: {problem}" for problem in self.problems]
        lines += [f"  label {label}" for label in self.labels]
        if self.ready:
            lines.append(f"  a synthetic volume went through it in {self.seconds:.1f} s")
        return "\n".join(lines)


def check_bundle(bundle_dir: Path, device: str = "auto", runtimes: Path | None = None) -> Report:
    """The check in the node's environment, or in the bundle's runtime among ``runtimes``."""
    report = Report(bundle_dir, str(choose_device(device)), made_with=made_with(bundle_dir),
                    runs={name: installed(name) for name in ("monai", "torch", "numpy")})
    report.problems += layout_problems(bundle_dir)
    if report.problems:
        return report
    started = time.perf_counter()
    try:
        bundle: Predicting
        if runtimes is None:
            bundle = Bundle(bundle_dir, choose_device(device))
        else:
            runtime = runtime_for(bundle_dir, runtimes)
            report.where = f"runtime {runtime.name}"
            bundle = RuntimeBundle(bundle_dir, device, runtime)
            report.runs = bundle.versions
    except Exception as error:  # noqa: BLE001 - every failure becomes the check's answer
        report.problems.append(diagnose(error, report.made_with))
        return report
    try:
        report.problems += check_loaded(bundle)
    finally:
        if isinstance(bundle, RuntimeBundle):
            bundle.close()
    report.seconds = time.perf_counter() - started
    overrides = bundle_overrides(bundle_dir)
    for value, name in sorted(bundle.info.labels.items()):
        codes = codes_for_label(name, overrides)
        code = codes.property_type
        known = "" if codes.known else " (no known code: a generic one is written)"
        report.labels.append(f"{value} {name}: {code.scheme_designator} {code.value} {code.meaning}{known}")
    return report


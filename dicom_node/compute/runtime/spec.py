"""What a bundle needs of its runtime, read from its metadata, and the name that keys it.

The Model Zoo's ``metadata.json`` names ``monai_version``, ``numpy_version`` and the packages
its code uses (``required_packages_version``, ``optional_packages_version``). The runtime takes
that MONAI exactly and the node's own PyTorch, whose build is the one that suits the machine
(a bundle's ``pytorch_version`` is what it was trained with, not what inference needs). The
other pins are asked for exactly first; the package registry may not offer that release for
this Python, and then the newest release of the same line is taken (`Pin.compatible`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path


class SpecError(ValueError):
    """The metadata does not say what a runtime would need to hold."""


# Names and versions reach pip's command line: anything else than a package name (PEP 508) or
# a release number (PEP 440) is refused, so that no metadata can pass pip an option.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+!]{0,63}")


def _checked(name: str, version: str) -> tuple[str, str]:
    if not _NAME.fullmatch(name) or not _VERSION.fullmatch(version):
        raise SpecError(f"configs/metadata.json names a package {name!r} {version!r} that is not a package name "
                        "and release")
    return name.lower().replace("_", "-"), version


@dataclass(frozen=True)
class Pin:
    """A package the bundle names with the version it was made with."""

    name: str
    version: str
    required: bool

    @property
    def exact(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def compatible(self) -> str:
        """The same line, not older: ``numpy~=1.22`` for 1.22.2 (>= 1.22, < 2)."""
        parts = self.version.split(".")
        if len(parts) < 2 or not all(part.isdigit() for part in parts[:2]):
            return f"{self.name}>={self.version}"
        return f"{self.name}~={parts[0]}.{parts[1]}"


# What every runtime holds beside what the bundle names, as the node's own environment does:
# Zoo metadata often leaves out what MONAI needs for a bundle's configuration (YAML, ignite for
# the scripts/ of many bundles, scikit-image for KeepLargestConnectedComponent, einops for the
# transformer networks of older MONAI, nibabel for its image readers). A pin of the bundle's own
# for one of them is taken instead.
ALWAYS = {"pyyaml": "pyyaml>=6", "pytorch-ignite": "pytorch-ignite>=0.4", "scikit-image": "scikit-image",
          "einops": "einops", "nibabel": "nibabel"}


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything a runtime holds that a bundle asks for; equal specs share one runtime."""

    monai: str
    torch: str
    python: str
    pins: tuple[Pin, ...]

    @property
    def key(self) -> str:
        described = json.dumps([self.monai, self.torch, self.python, sorted(ALWAYS.values()),
                                [[pin.name, pin.version, pin.required] for pin in self.pins]])
        return hashlib.sha256(described.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """The runtime's directory under ``data_dir/runtimes/``: readable, and unique per spec."""
        return f"monai-{self.monai}-{self.key}"

    def requirements(self, pins: str) -> list[str]:
        """What pip is asked for: MONAI and PyTorch exactly, and the pins ``exact``ly, as
        ``compatible`` releases, or only the ``required`` ones as compatible releases."""
        chosen = [pin for pin in self.pins if pins != "required" or pin.required]
        named = {pin.name for pin in chosen}
        return [f"monai=={self.monai}", f"torch=={self.torch}",
                *(requirement for name, requirement in ALWAYS.items() if name not in named),
                *(pin.exact if pins == "exact" else pin.compatible for pin in chosen)]


def node_torch() -> str:
    """The node's PyTorch release, without the build's local label (2.13.0, not 2.13.0+cpu)."""
    return importlib.metadata.version("torch").split("+")[0]


def spec_of(bundle_dir: Path) -> RuntimeSpec:
    try:
        metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    except (OSError, ValueError) as error:
        raise SpecError(f"cannot read {bundle_dir / 'configs' / 'metadata.json'}: {error}") from error
    monai = metadata.get("monai_version")
    if not isinstance(monai, str) or not monai.strip():
        raise SpecError("configs/metadata.json names no monai_version: there is no MONAI to make a runtime with")
    _, monai = _checked("monai", monai.strip())
    pins: dict[str, Pin] = {}
    if metadata.get("numpy_version") is not None:
        pins["numpy"] = Pin(*_checked("numpy", str(metadata["numpy_version"])), required=True)
    for field, required in (("optional_packages_version", False), ("required_packages_version", True)):
        named = metadata.get(field) or {}
        if not isinstance(named, dict):
            raise SpecError(f"configs/metadata.json: {field} is not a table of package names and versions")
        for name, version in named.items():
            canonical, version = _checked(str(name), str(version))
            if canonical not in ("monai", "torch", "numpy"):
                pins[canonical] = Pin(canonical, version, required)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return RuntimeSpec(monai, node_torch(), python, tuple(sorted(pins.values(), key=lambda p: p.name)))

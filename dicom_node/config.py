"""The node's TOML configuration, validated before anything starts.

Operators' files and scripts depend on these key names; they stay stable. Relative paths are
resolved against the configuration file's folder, so a configuration works wherever the node
is started from.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, StringConstraints, model_validator

AETitle = Annotated[str, StringConstraints(min_length=1, max_length=16, pattern=r"^[^\\]*[^\\ ]$")]


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a configuration must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(Strict):
    ae_title: AETitle = Field("DICOMNODE", description="The AE title the PACS is configured with.")
    host: str = Field("0.0.0.0", description="Address the DICOM listener binds to.")
    port: int = Field(11112, ge=1, le=65535, description="DICOM listener port.")
    data_dir: Path = Field(Path("var"), description="Received files, results and the SQLite database.")
    stable_after: float = Field(
        10.0, gt=0, description="Seconds without a new instance before a study counts as complete."
    )
    workers: int = Field(1, ge=1, le=64, description="Inference worker processes started by `serve`.")
    late_arrivals: Literal["reprocess", "ignore"] = Field(
        "reprocess",
        description="An instance new to an already processed study: re-open it and make new results "
        "after the next quiet period ('reprocess'), or only store it ('ignore').",
    )
    min_free_disk_mb: float = Field(
        1024, ge=0, description="Below this much free space under data_dir, C-STORE answers Out of Resources."
    )
    allowed_calling_ae_titles: list[AETitle] = Field(
        default_factory=list, description="Calling AE titles accepted; empty accepts any."
    )
    allowed_peers: list[IPvAnyNetwork] = Field(
        default_factory=list, description="Peer addresses or networks (CIDR) accepted; empty accepts any."
    )
    check_called_ae_title: bool = Field(
        True, description="Reject associations whose called AE title is not ae_title."
    )
    max_associations: int = Field(
        64, ge=1, le=1000, description="Concurrent associations accepted; more are rejected (A-ASSOCIATE-RJ)."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Tries of a job before it fails for good.")


class Destination(Strict):
    name: str = Field(description="Name pipelines use to refer to this destination.")
    ae_title: AETitle = Field(description="Called AE title of the destination's SCP.")
    host: str
    port: int = Field(ge=1, le=65535)
    retry_first_seconds: float = Field(2.0, gt=0, description="Wait after the first failed delivery.")
    retry_max_seconds: float = Field(300.0, gt=0, description="Longest wait between delivery attempts.")


class Pipeline(Strict):
    name: str = Field(description="Shown in status and in the results' series description.")
    model: Path = Field(description="A MONAI bundle directory (Model Zoo layout).")
    destinations: list[str] = Field(default_factory=list, description="Where results are sent.")
    select: dict[str, str | int | float] = Field(
        default_factory=dict,
        description="DICOM keyword = value; a series is taken when every condition holds.",
    )
    series_number: int = Field(
        900, ge=1, le=2**31 - 2, description="Series Number of the SEG; the SR takes the next number."
    )
    priority: int = Field(0, description="Jobs of higher priority are claimed first.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")


class PriorityRule(Strict):
    """Raise the priority of jobs on series that match, e.g. RequestedProcedurePriority = "STAT"."""

    priority: int = Field(description="Added to the pipeline's priority when every condition holds.")
    match: dict[str, str | int | float] = Field(description="DICOM keyword = value, as in select.")


class Config(Strict):
    node: NodeSettings = Field(default_factory=NodeSettings)
    destinations: list[Destination] = Field(default_factory=list)
    pipelines: list[Pipeline] = Field(default_factory=list)
    priorities: list[PriorityRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_resolve(self) -> "Config":
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique, got {names}")
        pipeline_names = [p.name for p in self.pipelines]
        if len(set(pipeline_names)) != len(pipeline_names):
            raise ValueError(f"pipeline names must be unique, got {pipeline_names}")
        for pipeline in self.pipelines:
            unknown = set(pipeline.destinations) - set(names)
            if unknown:
                raise ValueError(f"pipeline {pipeline.name!r} names unknown destinations {sorted(unknown)}")
        return self

    def destination(self, name: str) -> Destination:
        return next(d for d in self.destinations if d.name == name)

    def pipeline(self, name: str) -> Pipeline:
        return next(p for p in self.pipelines if p.name == name)

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.node.data_dir / 'dicom-node.sqlite'}"


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def load_config(path: Path) -> Config:
    """Read, validate and anchor relative paths to the file's folder."""
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    config = Config.model_validate(raw)
    base = path.resolve().parent
    node = config.node.model_copy(update={"data_dir": _resolve(base, config.node.data_dir)})
    pipelines = [p.model_copy(update={"model": _resolve(base, p.model)}) for p in config.pipelines]
    return config.model_copy(update={"node": node, "pipelines": pipelines})

"""The node's TOML configuration, validated before anything starts.

Operators' files and scripts depend on these key names; they stay stable. Relative paths are
resolved against the configuration file's folder, so a configuration works wherever the node
is started from.
"""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, StringConstraints, model_validator

AETitle = Annotated[str, StringConstraints(min_length=1, max_length=16, pattern=r"^[^\\]*[^\\ ]$")]


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a configuration must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsListener(Strict):
    """DICOM over TLS (PS3.15 Annex B, the BCP 195 profile): a listener of its own beside the plain one."""

    port: int = Field(2762, ge=1, le=65535, description="The TLS listener's port (2762 is DICOM's registered one).")
    certificate: Path = Field(description="The node's certificate (PEM), with its chain.")
    private_key: Path = Field(description="Its private key (PEM, unencrypted).")
    ca: Path | None = Field(None, description="CA certificates (PEM) that peers' certificates are verified against.")
    require_client_certificate: bool = Field(
        False, description="Refuse peers that present no certificate signed by `ca` (mutual TLS)."
    )

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TlsListener:
        if self.require_client_certificate and self.ca is None:
            raise ValueError("require_client_certificate needs `ca`, the certificates clients are verified against")
        return self


class NodeSettings(Strict):
    ae_title: AETitle = Field("DICOMNODE", description="The AE title the PACS is configured with.")
    host: str = Field("0.0.0.0", description="Address the DICOM listener binds to.")
    port: int = Field(11112, ge=1, le=65535, description="DICOM listener port.")
    plain: bool = Field(True, description="Serve plain DICOM on `port`; false with [node.tls] for TLS only.")
    tls: TlsListener | None = Field(None, description="A DICOM TLS listener ([node.tls]).")
    data_dir: Path = Field(Path("var"), description="Received files, results and the SQLite database.")
    stable_after: float = Field(
        10.0, gt=0, description="Seconds without a new instance before a study counts as complete."
    )
    workers: int = Field(
        1, ge=0, le=64,
        description="Inference worker processes started by `serve`; 0 for a node that only receives and sends, "
        "its jobs run by `dicom-node worker` on other hosts sharing its database.",
    )
    receivers: int = Field(
        1, ge=0, le=64,
        description="Processes that receive in parallel, sharing the listening socket and max_associations. "
        "One process group-commits the index rows of all its associations; several contend for "
        "SQLite's write lock. 0: one per CPU core, at most 4.",
    )
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
    max_instance_mb: float = Field(
        2048, gt=0,
        description="Largest instance (data set as received) a C-STORE may carry; a larger one is read to its end, "
        "not kept, and answered Out of Resources.",
    )
    acse_timeout: float = Field(
        10.0, gt=0, le=600,
        description="Seconds a new connection has to send its whole A-ASSOCIATE-RQ (ARTIM), however slowly.",
    )
    network_timeout: float = Field(
        60.0, gt=0, le=3600,
        description="Seconds an association may be silent, and that each PDU may take from its first byte to its last.",
    )
    lease_seconds: float = Field(
        60.0, gt=0, le=3600,
        description="A running job's lease, renewed by its worker every quarter of it; a worker silent longer "
        "(dead, stalled, paused) loses the job to another, and its late results are discarded.",
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Tries of a job before it fails for good.")
    model_memory_mb: float = Field(
        8192, gt=0, description="Loaded models a worker keeps warm, at most this many MB of weights."
    )


class Destination(Strict):
    name: str = Field(description="Name pipelines use to refer to this destination.")
    type: Literal["dimse", "dicomweb"] = Field(
        "dimse", description="'dimse': C-STORE to ae_title@host:port; 'dicomweb': STOW-RS to url."
    )
    ae_title: AETitle | None = Field(None, description="Called AE title of the destination's SCP (dimse).")
    host: str | None = Field(None, description="The SCP's host (dimse).")
    port: int | None = Field(None, ge=1, le=65535, description="The SCP's port (dimse).")
    url: Annotated[str, StringConstraints(pattern=r"^https?://")] | None = Field(
        None, description="The DICOMweb service's base (dicomweb): instances are POSTed to url/studies."
    )
    username: str | None = Field(None, description="HTTP basic authentication (dicomweb), with password.")
    password: str | None = Field(None, description="The basic authentication's password.")
    token: str | None = Field(None, description="A bearer token (dicomweb), sent as 'Authorization: Bearer'.")
    tls: bool = Field(False, description="DICOM over TLS; the destination's certificate is verified against `ca`.")
    ca: Path | None = Field(None, description="CA certificates (PEM) for the destination's; default: the system's.")
    certificate: Path | None = Field(None, description="The node's certificate (PEM), for a destination that asks.")
    private_key: Path | None = Field(None, description="Its private key (PEM).")

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.type == "dimse":
            if None in (self.ae_title, self.host, self.port) or self.url is not None:
                raise ValueError(f"destination {self.name!r}: a DIMSE destination has ae_title, host and port, no url")
            if self.username or self.token:
                raise ValueError(f"destination {self.name!r}: username, password and token are for dicomweb")
        else:
            if self.url is None or self.ae_title or self.host or self.port or self.tls:
                raise ValueError(f"destination {self.name!r}: a dicomweb destination has a url (https:// for TLS), "
                                 "no ae_title, host, port or tls")
            if (self.username is None) != (self.password is None) or (self.username and self.token):
                raise ValueError(f"destination {self.name!r}: username with password, or token, not both")
        return self

    @property
    def address(self) -> str:
        """Where it is, as status and the dashboard show it."""
        return self.url if self.type == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"
    retry_first_seconds: float = Field(2.0, gt=0, description="Wait after the first failed delivery.")
    retry_max_seconds: float = Field(300.0, gt=0, description="Longest wait between delivery attempts.")
    rejection_notes: bool = Field(
        True, description="When a rerun replaces results this destination was sent, send it an IOCM rejection note "
                          "(Key Object Selection, 'Rejected for Quality Reasons') naming the old SEG and SR."
    )


Scalar = str | int | float | bool


class Condition(Strict):
    """A condition on one DICOM keyword or series fact; every operator given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    regex: str | None = Field(None, description="Full match of the value's text.")
    ignore_case: bool = Field(False, description="Makes `regex` case-insensitive.")
    min: float | None = Field(None, description="Numeric lower bound, inclusive.")
    max: float | None = Field(None, description="Numeric upper bound, inclusive.")
    in_: list[Scalar] | None = Field(None, alias="in", description="The value is one of these.")
    contains: list[str] | None = Field(None, description="A multi-valued attribute holds all of these.")
    excludes: list[str] | None = Field(None, description="A multi-valued attribute holds none of these.")
    not_: Scalar | list[Scalar] | None = Field(None, alias="not", description="The value is none of these.")

    @model_validator(mode="after")
    def _meaningful(self) -> Condition:
        operators = (self.regex, self.min, self.max, self.in_, self.contains, self.excludes, self.not_)
        if all(operator is None for operator in operators):
            raise ValueError("a condition needs one of regex, min, max, in, contains, excludes, not")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as error:
                raise ValueError(f"invalid regex {self.regex!r}: {error}") from error
        return self


SelectBlock = dict[str, Scalar | Condition]


class Pipeline(Strict):
    name: str = Field(description="Shown in status and in the results' series description.")
    model: Path = Field(description="A MONAI bundle directory (Model Zoo layout).")
    destinations: list[str] = Field(default_factory=list, description="Where results are sent.")
    select: SelectBlock | list[SelectBlock] = Field(
        default_factory=dict,
        description="Conditions on DICOM keywords and series facts; all of a block must hold. "
        "Several blocks ([[pipelines.select]]) are alternatives.",
    )
    take: Literal["one", "all"] = Field("one", description="One series per study, or every matching one.")
    prefer: Literal["thinnest", "most_images"] = Field(
        "thinnest", description="Which matching series `take = 'one'` picks (ties go to the other criterion)."
    )
    series_number: int | None = Field(
        None,
        ge=1,
        le=2**31 - 2,
        description="Series Number of the SEG; the SR takes the next number. "
        "Default: 900 for the first pipeline, 910 for the second, and so on.",
    )
    segments: Path | None = Field(
        None, description="A TOML file overriding segment names, codes and colours (docs/segments.md)."
    )
    outlines: bool = Field(
        False,
        description="Also send a Secondary Capture series (Series Number of the SEG + 2): each source image "
        "with a segment, the segments outlined, for PACS and viewers that cannot display SEG.",
    )
    timeout_seconds: float = Field(
        1800.0, gt=0, description="A job running longer fails with that reason and frees what it held."
    )
    priority: int = Field(0, description="Jobs of higher priority are claimed first.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")
    runtime: Literal["node", "bundle", "auto"] = Field(
        "node",
        description="Where the bundle runs: 'node', the node's own MONAI; 'bundle', the runtime made for the MONAI "
        "its metadata names (`dicom-node bundle prepare`); 'auto', the node's when the bundle passes its check "
        "there, else the bundle's (docs/bundles.md).",
    )

    @property
    def select_blocks(self) -> list[SelectBlock]:
        return self.select if isinstance(self.select, list) else [self.select]


class PriorityRule(Strict):
    """Raise the priority of jobs on series that match, e.g. RequestedProcedurePriority = "STAT"."""

    priority: int = Field(description="Added to the pipeline's priority when every condition holds.")
    match: SelectBlock = Field(description="Conditions, as in a select block.")


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class HttpSettings(Strict):
    """The operator's HTTP surface: dashboard, REST API, metrics, health (docs/operations.md)."""

    enabled: bool = Field(True, description="Serve the dashboard, API, metrics and health endpoints.")
    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8080, ge=1, le=65535, description="HTTP port.")
    require_login: bool | None = Field(
        None,
        description="Ask for a user or an API token. Default: only when host is not a loopback address; "
        "listening elsewhere cannot be made open.",
    )

    @property
    def login_required(self) -> bool:
        if self.host not in LOOPBACK_HOSTS:
            return True
        return bool(self.require_login)


WebhookEvent = Literal["study.done", "study.failed", "delivery.dead"]


class Webhook(Strict):
    """A URL the node posts JSON to when a study ends or a delivery gives up (docs/operations.md)."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://")] = Field(description="http:// or https:// URL.")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: ["study.done", "study.failed", "delivery.dead"], description="Events posted."
    )
    secret: str | None = Field(
        None, description="Key of the HMAC-SHA256 signature sent in X-Dicom-Node-Signature; unsigned without it."
    )
    timeout_seconds: float = Field(10.0, gt=0, le=120, description="Time one POST may take.")
    max_attempts: int = Field(10, ge=1, le=100, description="Tries (with backoff) before the event is dropped.")


class DatabaseSettings(Strict):
    """Where the node's state lives (docs/configuration.md#database)."""

    url: Annotated[str, StringConstraints(pattern=r"^(sqlite:///|postgres(ql)?://)")] | None = Field(
        None,
        description="postgresql://user@host:port/name for PostgreSQL (the password from PGPASSWORD or ~/.pgpass, "
        "as libpq reads them, or in the URL); default: the embedded SQLite file in data_dir.",
    )


DAY_SECONDS = 86400.0
Days = Annotated[float, Field(ge=0)] | Literal["forever"]


class RetentionSettings(Strict):
    """How long a finished study's files and records are kept (docs/operations.md#retention).

    A study is finished once nothing is receiving, queued or running for it and every result is
    delivered: a pending or dead-lettered delivery keeps all of it, whatever its age or the disk."""

    instances_days: Days = Field(
        7, description="Days received instances are kept after their study finished; 'forever' keeps them."
    )
    results_days: Days = Field(
        30, description="Days the results the node made (SEG, SR, outlines) are kept after their study finished."
    )
    records_days: Days = Field(
        365, description="Days the study's rows (jobs, results, deliveries, events) are kept after it finished; "
        "never before its files."
    )
    purge_below_free_mb: float | None = Field(
        None, ge=0,
        description="When free space under data_dir falls below this, the files of the oldest finished studies go "
        "first, whatever their age, until it is back above. Default: twice min_free_disk_mb; 0 turns it off.",
    )
    check_every_seconds: float = Field(60.0, gt=0, le=86400, description="How often the policy is applied.")

    @model_validator(mode="after")
    def _records_outlive_files(self) -> RetentionSettings:
        records = self.seconds(self.records_days)
        for name in ("instances_days", "results_days"):
            if self.seconds(getattr(self, name)) > records:
                raise ValueError(f"records_days ({self.records_days}) must be at least {name} "
                                 f"({getattr(self, name)}): a study's rows are what says its files are to go")
        return self

    @staticmethod
    def seconds(days: float | str) -> float:
        return float("inf") if days == "forever" else float(days) * DAY_SECONDS


class Config(Strict):
    node: NodeSettings = Field(default_factory=NodeSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    destinations: list[Destination] = Field(default_factory=list)
    pipelines: list[Pipeline] = Field(default_factory=list)
    priorities: list[PriorityRule] = Field(default_factory=list)
    webhooks: list[Webhook] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        if not self.node.plain and self.node.tls is None:
            raise ValueError("node.plain = false leaves no listener: configure [node.tls]")
        if self.node.tls is not None and self.node.plain and self.node.tls.port == self.node.port:
            raise ValueError(f"node.port and node.tls.port are both {self.node.port}")
        for destination in self.destinations:
            if (destination.certificate is None) != (destination.private_key is None):
                raise ValueError(f"destination {destination.name!r}: certificate and private_key go together")
            secure = destination.tls or (destination.url or "").startswith("https://")
            if not secure and (destination.ca or destination.certificate):
                raise ValueError(f"destination {destination.name!r}: ca, certificate and private_key need tls = true "
                                 "(or an https:// url)")
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
        high_water = self.retention.purge_below_free_mb
        if high_water and high_water < self.node.min_free_disk_mb:
            raise ValueError(f"retention.purge_below_free_mb ({high_water:g}) must be at least node.min_free_disk_mb "
                             f"({self.node.min_free_disk_mb:g}): purging must start before storing stops")
        taken: dict[int, str] = {}
        for pipeline in self.pipelines:
            for number in range(self.series_number(pipeline), self.series_number(pipeline) + 3):
                if number in taken:
                    raise ValueError(f"pipelines {taken[number]!r} and {pipeline.name!r} would both write series "
                                     f"number {number} (SEG, SR and outlines take series_number to series_number + 2)")
                taken[number] = pipeline.name
        return self

    def destination(self, name: str) -> Destination:
        return next(d for d in self.destinations if d.name == name)

    def pipeline(self, name: str) -> Pipeline:
        return next(p for p in self.pipelines if p.name == name)

    def series_number(self, pipeline: Pipeline) -> int:
        """The SEG's Series Number: configured, or deterministic by the pipeline's position."""
        if pipeline.series_number is not None:
            return pipeline.series_number
        return 900 + 10 * self.pipelines.index(pipeline)

    @property
    def instance_name(self) -> str:
        """This node among those that share a data_dir: its host and DICOM port. Names the
        folders that are its own (files made ahead, metrics), which another node's start must
        not empty."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{socket.gethostname()}-{self.node.port}")

    @property
    def purge_below_free_mb(self) -> float:
        """Free space (MB) under which finished studies are purged oldest first; 0: never."""
        configured = self.retention.purge_below_free_mb
        return 2 * self.node.min_free_disk_mb if configured is None else configured

    @property
    def database_path(self) -> Path:
        """The SQLite database's file: in data_dir unless [database] names another."""
        url = self.database.url
        if url is not None and url.startswith("sqlite:///"):
            return Path(url.removeprefix("sqlite:///"))
        return self.node.data_dir / "dicom-node.sqlite"

    @property
    def embedded_database(self) -> bool:
        return self.database.url is None or self.database.url.startswith("sqlite:///")

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.database_path}"


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def load_config(path: Path) -> Config:
    """Read, validate and anchor relative paths to the file's folder."""
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    config = Config.model_validate(raw)
    base = path.resolve().parent
    tls = config.node.tls
    if tls is not None:
        tls = tls.model_copy(update={"certificate": _resolve(base, tls.certificate),
                                     "private_key": _resolve(base, tls.private_key),
                                     "ca": _resolve(base, tls.ca) if tls.ca else None})
    node = config.node.model_copy(update={"data_dir": _resolve(base, config.node.data_dir), "tls": tls})
    destinations = [d.model_copy(update={key: _resolve(base, getattr(d, key)) for key in ("ca", "certificate",
                                                                                          "private_key")
                                          if getattr(d, key) is not None}) for d in config.destinations]
    pipelines = [
        p.model_copy(
            update={"model": _resolve(base, p.model), "segments": _resolve(base, p.segments) if p.segments else None}
        )
        for p in config.pipelines
    ]
    return config.model_copy(update={"node": node, "pipelines": pipelines, "destinations": destinations})

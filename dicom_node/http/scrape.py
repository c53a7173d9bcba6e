"""`GET /metrics`: the counters of every process of the node, summed, and gauges of what the
database and the supervisor know at the moment of the scrape (`docs/operations.md` lists them).

The gauges are read at each scrape, not kept up to date by the processes that change them:
the database is the truth for studies, jobs and deliveries, so the numbers cannot drift from
what `status` shows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import Engine, func, select

from dicom_node.config import Config
from dicom_node.http.health import NodeProcesses, free_disk_bytes
from dicom_node.metrics_folder import MULTIPROCESS_ENV
from dicom_node.state import db, overview


class NodeStateCollector(Collector):
    def __init__(self, config: Config, engine: Engine, processes: NodeProcesses) -> None:
        self.config = config
        self.engine = engine
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        with db.reading(self.engine) as connection:
            states = overview.study_states(connection)
            jobs = overview.job_counts(connection)
            deliveries = overview.delivery_counts(connection)
            webhooks = dict(connection.execute(
                select(db.webhook_posts.c.state, func.count()).group_by(db.webhook_posts.c.state)).all())
        studies = GaugeMetricFamily("dicom_node_studies", "Studies by state, as `status` derives it.", labels=["state"])
        for state in overview.STUDY_STATES:
            studies.add_metric([state], sum(value == state for value in states.values()))
        yield studies
        job_gauge = GaugeMetricFamily("dicom_node_jobs", "Jobs by pipeline and state.", labels=["pipeline", "state"])
        for pipeline in self.config.pipelines:
            for state in overview.JOB_STATES:
                job_gauge.add_metric([pipeline.name, state], jobs.get((pipeline.name, state), 0))
        yield job_gauge
        delivery_gauge = GaugeMetricFamily("dicom_node_deliveries", "Result deliveries by destination and state "
                                           "(dead: given up, waiting for an operator).", labels=["destination", "state"])
        for destination in self.config.destinations:
            for state in overview.DELIVERY_STATES:
                delivery_gauge.add_metric([destination.name, state], deliveries.get((destination.name, state), 0))
        yield delivery_gauge
        webhook_gauge = GaugeMetricFamily("dicom_node_webhook_posts", "Webhook posts by state.", labels=["state"])
        for state in ("pending", "sent", "dead"):
            webhook_gauge.add_metric([state], webhooks.get(state, 0))
        yield webhook_gauge
        yield GaugeMetricFamily("dicom_node_free_disk_bytes", "Free space under data_dir.",
                                value=free_disk_bytes(self.config))
        yield GaugeMetricFamily("dicom_node_workers_alive", "Inference worker processes alive.",
                                value=self.processes.workers_alive())
        yield GaugeMetricFamily("dicom_node_workers_configured", "Inference worker processes configured.",
                                value=self.config.node.workers)
        yield GaugeMetricFamily("dicom_node_receivers_alive", "Receiver processes alive.",
                                value=self.processes.receivers_alive())


class _ThisProcess(Collector):
    """The counters of this process alone: the node runs without the multiprocess folder."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def registry(config: Config, engine: Engine, processes: NodeProcesses) -> CollectorRegistry:
    """The counters of all processes (from the multiprocess folder when `serve` set one, else this
    process's own) and the node's state. Nothing is collected until a scrape asks."""
    scraped = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(scraped)
    else:
        scraped.register(_ThisProcess())
    scraped.register(NodeStateCollector(config, engine, processes))
    return scraped


def exposition(scraped: CollectorRegistry) -> bytes:
    return generate_latest(scraped)

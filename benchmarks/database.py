"""The node on PostgreSQL beside the embedded SQLite: ingest rate, and jobs a minute with 1, 2
and 4 workers.

    .venv/bin/python benchmarks/database.py [--small 1000] [--studies 8] [--workers 1 2 4] [--repeat 2]

In the same run, for each backend in turn (PostgreSQL in a cluster made for the run, on this
machine, as `tests/support/postgres.py` makes it):

- ingest: ``--small`` 64 x 64 CT images over 4 associations into a node with no pipeline, from the
  first byte to the last acknowledgement (the receiver's index commits are where the backends
  differ);
- jobs: ``--studies`` small CT studies (24 images of 128 x 128) pushed to a node with the demo
  pipeline and ``W`` workers, from the last acknowledgement to the last job done, as jobs a
  minute. On this machine's two cores, more workers share the same CPU: the point is what the
  database adds, so the ratio PostgreSQL / SQLite at each W is what to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import free_port, send, start_node, table, wait_for, write_ct, write_node_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.postgres import PostgresCluster


def ingest_rate(workdir: Path, database_url: str | None, paths: list[Path]) -> float:
    port = free_port()
    config = write_node_config(workdir, port, destinations=[], pipelines=[], stable_after=600, min_free_disk_mb=0,
                               database_url=database_url, http={"enabled": False})
    node = start_node(config, port)
    try:
        return len(paths) / send(node.ae_title, port, paths, 4)
    finally:
        node.stop()


def jobs_a_minute(workdir: Path, database_url: str | None, studies: list[list[Path]], workers: int) -> float:
    port = free_port()
    config = write_node_config(
        workdir, port, destinations=[], stable_after=1, min_free_disk_mb=0, workers=workers,
        database_url=database_url, http={"enabled": False},
        pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "select": {"Modality": "CT"}}],
    )
    node = start_node(config, port)
    try:
        wait_for(lambda: len(node.ready_workers()) >= workers, 180, "the workers")
        for paths in studies:
            send(node.ae_title, port, paths, 1)
        sent = time.perf_counter()
        wait_for(lambda: node.query("SELECT count(*) FROM jobs WHERE state = 'done'") == [(len(studies),)], 900,
                 "every job done", 0.1)
        return len(studies) / (time.perf_counter() - sent) * 60
    finally:
        node.stop()


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--small", type=int, default=1000)
    options.add_argument("--studies", type=int, default=8)
    options.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    options.add_argument("--repeat", type=int, default=2)
    args = options.parse_args()
    postgres = PostgresCluster()
    try:
        with tempfile.TemporaryDirectory() as scratch_name:
            scratch = Path(scratch_name)
            small = write_ct(scratch / "small", args.small, 64)
            studies = [small_study(scratch / f"study{n}", slices=24, seed=n)[1] for n in range(args.studies)]
            backends = {"SQLite": lambda: None, "PostgreSQL": postgres.database}
            measured: dict[tuple[str, str], list[float]] = {}
            for repetition in range(args.repeat):
                for backend, database in backends.items():  # alternated: the machine's drift hits both
                    run = scratch / f"{backend}-{repetition}"
                    key = (backend, "ingest, images/s")
                    measured.setdefault(key, []).append(ingest_rate(run / "ingest", database(), small))
                    for workers in args.workers:
                        key = (backend, f"jobs/min, {workers} worker(s)")
                        measured.setdefault(key, []).append(
                            jobs_a_minute(run / f"jobs-{workers}", database(), studies, workers))
                    print(f"run {repetition + 1} of {args.repeat} on {backend} done", flush=True)
    finally:
        postgres.stop()
    rows = []
    for measure in dict.fromkeys(name for _, name in measured):
        sqlite, postgresql = (statistics.median(measured[(backend, measure)]) for backend in ("SQLite", "PostgreSQL"))
        rows.append([measure, f"{sqlite:.1f}", f"{postgresql:.1f}", f"{postgresql / sqlite:.2f}"])
    print(f"median of {args.repeat} run(s)")
    print(table(["measure", "SQLite", "PostgreSQL", "PostgreSQL / SQLite"], rows))


if __name__ == "__main__":
    main()

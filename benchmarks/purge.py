"""What a purge costs: 1,000 finished studies' instances, results and rows, against `rm -rf`.

    .venv/bin/python benchmarks/purge.py [--studies 1000] [--instances 20] [--kb 64]

A node's database and files are made for ``--studies`` finished studies (each ``--instances``
files of ``--kb`` KB, one job, a SEG delivered), beside as many studies still being processed,
which the purge must leave. Then, in the same run:

- the plan alone (`dicom-node purge --dry-run`: which studies are finished, and what is due);
- the purge of the instances and results of every finished study (`retention.run`, one study at a
  time: files, then rows, each study's removal a transaction with its event);
- the purge of their rows;
- the reference: `rm -rf` of a copy of the same files, which is what removing them costs the
  filesystem with no bookkeeping at all.

The ratio of the node's file purge to `rm -rf` says what the bookkeeping adds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import table

from dicom_node.config import Config
from dicom_node.state import db, files, retention

NOW = time.time()


def make_node(data_dir: Path, studies: int, instances: int, size: int) -> None:
    """Rows and files of ``studies`` finished studies, and as many with a job still queued."""
    engine = db.connect(f"sqlite:///{data_dir / 'dicom-node.sqlite'}")
    content = b"\0" * size
    with engine.begin() as connection:
        for number in range(2 * studies):
            uid, finished = f"1.2.{number + 1}", number < studies
            at = NOW - 3600.0
            connection.execute(db.studies.insert().values(study_uid=uid, state="complete", first_received_at=at,
                                                          last_received_at=at, completed_at=at))
            connection.execute(db.series.insert().values(series_uid=uid + ".1", study_uid=uid))
            rows = []
            for image in range(instances):
                path = files.instance_path(data_dir, uid, uid + ".1", f"{uid}.1.{image + 1}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
                os.utime(path, (at, at))  # written when received
                rows.append({"sop_instance_uid": f"{uid}.1.{image + 1}", "series_uid": uid + ".1", "study_uid": uid,
                             "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                             "path": str(path), "size": size, "sha256": "0" * 64, "received_at": at})
            connection.execute(db.instances.insert(), rows)
            job_id = connection.execute(db.jobs.insert().values(
                study_uid=uid, series_uid=uid + ".1", pipeline="p", state="done" if finished else "queued",
                created_at=at, finished_at=at if finished else None)).inserted_primary_key[0]
            if finished:
                result = files.result_path(data_dir, uid, uid + ".9", uid + ".9.1")
                result.parent.mkdir(parents=True, exist_ok=True)
                result.write_bytes(content)
                result_id = connection.execute(db.results.insert().values(
                    job_id=job_id, kind="SEG", sop_instance_uid=uid + ".9.1", series_uid=uid + ".9", path=str(result),
                    created_at=at)).inserted_primary_key[0]
                connection.execute(db.deliveries.insert().values(result_id=result_id, destination="pacs", state="sent",
                                                                 not_before=0, sent_at=at))
    engine.dispose()


def policy(data_dir: Path, records: float | str) -> Config:
    return Config.model_validate({"node": {"data_dir": str(data_dir), "min_free_disk_mb": 0}, "retention": {
        "instances_days": 0, "results_days": 0, "records_days": records, "purge_below_free_mb": 0}})


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    outcome = action()
    return time.perf_counter() - started, outcome


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--studies", type=int, default=1000)
    options.add_argument("--instances", type=int, default=20)
    options.add_argument("--kb", type=int, default=64)
    args = options.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data_dir, copy = Path(work) / "data", Path(work) / "copy"
        started = time.perf_counter()
        make_node(data_dir, args.studies, args.instances, args.kb * 1024)
        print(f"{2 * args.studies} studies made in {time.perf_counter() - started:.0f} s "
              f"({args.studies} finished, {args.instances + 1} files of {args.kb} KB each)", flush=True)
        subprocess.run(["sync"], check=True)
        shutil.copytree(data_dir / "studies", copy / "studies")
        shutil.copytree(data_dir / "results", copy / "results")
        subprocess.run(["sync"], check=True)
        engine = db.connect(f"sqlite:///{data_dir / 'dicom-node.sqlite'}")
        plan_s, planned = timed(lambda: retention.run(policy(data_dir, "forever"), engine, dry_run=True))
        files_s, purged = timed(lambda: retention.run(policy(data_dir, "forever"), engine))
        records_s, records = timed(lambda: retention.run(policy(data_dir, 0), engine))
        rm_s, _ = timed(lambda: subprocess.run(["rm", "-rf", str(copy / "studies"), str(copy / "results")], check=True))
        left = sum(1 for _ in (data_dir / "studies").rglob("*.dcm"))
    finished_files = args.studies * (args.instances + 1)
    rows = [
        ["plan (purge --dry-run)", f"{plan_s:.2f}", f"{len(planned)} purges", "-"],
        ["node: files, one study at a time", f"{files_s:.2f}", f"{sum(p.files for p in purged)} files",
         f"{files_s / rm_s:.1f}"],
        ["node: rows", f"{records_s:.2f}", f"{len(records)} studies", "-"],
        ["rm -rf of the same files", f"{rm_s:.2f}", f"{finished_files} files", "1.0"],
    ]
    print(table(["step", "seconds", "what", "vs rm -rf"], rows))
    print(f"files of the {args.studies} studies still being processed: {left} of {args.studies * args.instances} "
          "left in place")


if __name__ == "__main__":
    main()

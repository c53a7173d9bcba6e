"""The `dicom-node` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from dicom_node import __version__
from dicom_node.logs import setup_logging
from dicom_node.printable import printable


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description="A DICOM node that runs MONAI bundles.")
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "receive studies, run pipelines, send results (the whole node)"),
        ("worker", "run only inference workers against a shared database"),
        ("status", "print each study with its state, jobs and results"),
        ("retry", "re-queue failed jobs (of the given studies, or all) and send pending results now"),
        ("rerun", "run the finished jobs of the given studies again; new results supersede the old"),
        ("explain", "print, series by series, why each pipeline takes it or not"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--config", type=Path, required=True, help="the node's TOML configuration")
        if name == "retry":
            command.add_argument("studies", nargs="*", metavar="STUDY_UID", help="Study Instance UIDs")
        if name == "rerun":
            command.add_argument("studies", nargs="+", metavar="STUDY_UID", help="Study Instance UIDs")
        if name == "explain":
            command.add_argument("study", metavar="STUDY_UID", help="a stored study's Study Instance UID")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    from dicom_node.config import load_config

    try:
        config = load_config(args.config)
    except (OSError, ValueError, ValidationError) as error:
        print(f"dicom-node: invalid configuration {args.config}: {error}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from dicom_node.service import serve

        return serve(args.config)
    if args.command == "worker":
        from dicom_node.service import run_worker

        return run_worker(args.config)
    from dicom_node.state import db

    database = config.database_path
    if not database.exists():
        print(f"dicom-node: no node database at {database}: is data_dir in {args.config} the node's? "
              "(`dicom-node serve` creates it)", file=sys.stderr)
        return 2
    engine = db.connect(config.database_url)
    named = getattr(args, "studies", None) or ([args.study] if args.command == "explain" else [])
    unknown = db.unknown_studies(engine, named)
    if unknown:
        print("dicom-node: no study received with the Study Instance UID " +
              ", ".join(printable(uid) for uid in unknown), file=sys.stderr)
        return 1
    if args.command == "retry":
        from dicom_node.state.jobs import requeue_failed

        retried = requeue_failed(engine, args.studies)
        print(f"{retried.jobs} failed job(s) re-queued")
        if retried.studies:
            print(f"{retried.studies} failed study(ies) re-opened")
        if retried.dead_letters:
            print(f"{retried.dead_letters} dead-lettered deliveries pending again")
        return 0
    if args.command == "rerun":
        from dicom_node.state.jobs import rerun

        print(f"{rerun(engine, args.studies)} job(s) queued to run again")
        return 0
    if args.command == "explain":
        from dicom_node.state.completion import explain

        print(explain(config, engine, args.study))
        return 0
    from dicom_node.state.status import collect, render

    print(render(collect(engine)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

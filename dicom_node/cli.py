"""The `dicom-node` command."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from pydantic import ValidationError

from dicom_node import __version__
from dicom_node.logs import setup_logging
from dicom_node.printable import printable

ROLES = ("viewer", "operator", "admin")  # as `state.accounts` orders them; that module loads argon2


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
        ("purge", "apply the retention policy now: remove what [retention] says has had its time"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--config", type=Path, required=True, help="the node's TOML configuration")
        if name == "retry":
            command.add_argument("studies", nargs="*", metavar="STUDY_UID", help="Study Instance UIDs")
        if name == "rerun":
            command.add_argument("studies", nargs="+", metavar="STUDY_UID", help="Study Instance UIDs")
        if name == "explain":
            command.add_argument("study", metavar="STUDY_UID", help="a stored study's Study Instance UID")
        if name == "purge":
            command.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    database = commands.add_parser("db", help="bring the node's database schema to this version",
                                   description="upgrade: migrate the database named by the configuration to the "
                                   "schema of this version of the node, in place (every start does it too).")
    database.add_argument("action", choices=("upgrade",))
    database.add_argument("--config", type=Path, required=True, help="the node's TOML configuration")
    user = commands.add_parser("user", help="add or remove a user of the dashboard and API",
                               description="Add a user (or change an existing one's role and password), or remove one. "
                               "The password is asked for, or read as one line from standard input.")
    user.add_argument("action", choices=("add", "remove"))
    user.add_argument("name")
    user.add_argument("--role", choices=ROLES, default="viewer")
    user.add_argument("--config", type=Path, required=True, help="the node's TOML configuration")
    token = commands.add_parser("token", help="create an API token (printed once)",
                                description="Create an API token for scripts: send it as 'Authorization: Bearer TOKEN'.")
    token.add_argument("action", choices=("create",))
    token.add_argument("name", help="what the token is for, as the audit trail names it")
    token.add_argument("--role", choices=ROLES, default="viewer")
    token.add_argument("--config", type=Path, required=True, help="the node's TOML configuration")
    bundle = commands.add_parser(
        "bundle", help="check that a MONAI bundle runs here, or prepare its own runtime",
        description="check: load all the node uses of a bundle (network, weights, preprocessing, inferer, "
        "postprocessing), run a small synthetic volume through it, and say what is wrong, or that it is ready with the "
        "labels and codes it will write; in the node's environment, or with --runtime bundle in the runtime prepared "
        "for it. prepare: make the bundle's runtime under data_dir/runtimes/ (a Python environment with the MONAI its "
        "metadata names, for pipelines with runtime = \"bundle\"), then check the bundle in it. Both exit 0 when the "
        "bundle is ready, 1 when not.")
    bundle.add_argument("action", choices=("check", "prepare"))
    bundle.add_argument("directory", type=Path, help="the bundle's directory (Model Zoo layout)")
    bundle.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    bundle.add_argument("--runtime", choices=("node", "bundle"), default="node",
                        help="check in the node's environment (default) or in the bundle's prepared runtime")
    bundle.add_argument("--config", type=Path, help="the node's TOML configuration: where its runtimes are "
                        "(needed by prepare and by --runtime bundle)")
    return parser


def _bundle(args) -> int:
    """`bundle check` and `bundle prepare`; PyTorch and MONAI are loaded here only."""
    runtimes = None
    if args.action == "prepare" or args.runtime == "bundle":
        if args.config is None:
            print(f"dicom-node: bundle {args.action}{' --runtime bundle' if args.action == 'check' else ''} needs "
                  "--config: the runtimes are kept in the node's data_dir", file=sys.stderr)
            return 2
        from dicom_node.compute.runtime.prepare import runtimes_dir
        from dicom_node.config import load_config

        try:
            runtimes = runtimes_dir(load_config(args.config).node.data_dir)
        except (OSError, ValueError, ValidationError) as error:
            print(f"dicom-node: invalid configuration {args.config}: {error}", file=sys.stderr)
            return 2
    directory = args.directory.resolve()
    if args.action == "prepare":
        from dicom_node.compute.runtime.prepare import PrepareError, prepare
        from dicom_node.compute.runtime.spec import SpecError

        try:
            prepare(directory, runtimes, lambda line: print(line, flush=True))
        except (PrepareError, SpecError) as error:
            print(f"dicom-node: {error}", file=sys.stderr)
            return 1
    from dicom_node.compute.bundle_check import check_bundle

    report = check_bundle(directory, args.device, runtimes)
    print(report.render())
    return 0 if report.ready else 1


def _password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


def _accounts(args, engine) -> int:
    from dicom_node.state import accounts

    try:
        if args.command == "token":
            print(accounts.create_token(engine, args.name, args.role))
            print(f"API token for {args.name} ({args.role}): shown this once, keep it safe", file=sys.stderr)
        elif args.action == "add":
            created = accounts.add_user(engine, args.name, args.role, _password())
            print(f"user {args.name} {'added' if created else 'changed'} with the role {args.role}")
        elif not accounts.remove_user(engine, args.name):
            print(f"dicom-node: no user {args.name}", file=sys.stderr)
            return 1
        else:
            print(f"user {args.name} removed")
    except ValueError as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return 2
    return 0


def _upgrade(config) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from dicom_node.state import db, migrate

    try:
        before, after = migrate.upgrade(db.engine_for(config.database_url))
    except SQLAlchemyError as error:
        print(f"dicom-node: cannot upgrade the database: {error}", file=sys.stderr)
        return 1
    if before is None:
        print(f"database created at revision {after}")
    elif before == after:
        print(f"database already at revision {after}")
    else:
        print(f"database upgraded from revision {before} to {after}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    if args.command == "bundle":
        return _bundle(args)
    from dicom_node.config import load_config

    try:
        config = load_config(args.config)
    except (OSError, ValueError, ValidationError) as error:
        print(f"dicom-node: invalid configuration {args.config}: {error}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from dicom_node.metrics_folder import use_folder

        use_folder(config.node.data_dir, config.instance_name)  # before prometheus_client is imported
        from dicom_node.service import serve

        return serve(args.config)
    if args.command == "worker":
        from dicom_node.service import run_worker

        return run_worker(args.config)
    from dicom_node.state import db

    if args.command == "db":
        return _upgrade(config)
    if args.command in ("user", "token"):  # before the first start too: the database is made if need be
        return _accounts(args, db.connect(config.database_url))
    database = config.database_path
    if config.embedded_database and not database.exists():
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
    if args.command == "purge":
        from dicom_node.state.retention import describe, run

        outcomes = run(config, engine, dry_run=args.dry_run)
        print("\n".join(describe(outcome) for outcome in outcomes) or "nothing to purge")
        return 0
    if args.command == "explain":
        from dicom_node.state.completion import explain

        print(explain(config, engine, args.study))
        return 0
    from dicom_node.state.pipeline_checks import disabled
    from dicom_node.state.status import collect, render

    with db.reading(engine) as connection:
        print(render(collect(engine), disabled(connection)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

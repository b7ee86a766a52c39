"""``python -m launcher``: submit jobs to SLURM (or run them locally), watch, resume, cancel them."""

from __future__ import annotations

import argparse
import sys

from launcher import cli

# subcommand -> (function, its arguments, help)
COMMANDS = {
    "submit": (cli.submit, cli.submit_args, "validate a job YAML and submit it (or run it with --local)"),
    "status": (cli.status, cli.status_args, "a table of runs: state, jobs, step, loss, requeues, ETA"),
    "resume": (cli.resume, cli.resume_args, "resubmit a cancelled or failed run; it resumes from its checkpoint"),
    "cancel": (cli.cancel, cli.cancel_args, "scancel a run's active jobs"),
    "logs": (cli.logs, cli.logs_args, "print (or --follow) a task's log"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher", description="Launch lenstrain jobs on SLURM (or locally) and watch them."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (func, configure, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

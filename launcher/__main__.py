"""``python -m launcher``: submit jobs to SLURM (or run them locally), watch, resume, cancel them."""

from __future__ import annotations

import argparse
import sys

from launcher import cli
from shards import clikit
from shards.clikit import Command, run_cli

PROG = "launcher"
DESCRIPTION = "Launch lenstrain jobs on SLURM (or locally) and watch them."

# subcommand name -> its row: help, arguments, the function that runs it
COMMANDS = {
    command.name: command
    for command in (
        Command("submit", "validate a job YAML and submit it (or run it with --local)", cli.submit_args, cli.submit),
        Command("status", "a table of runs: state, jobs, step, loss, requeues, ETA", cli.status_args, cli.status),
        Command("resume", "resubmit a cancelled or failed run; it resumes from its checkpoint", cli.resume_args,
                cli.resume),
        Command("cancel", "scancel a run's active jobs (or stop its --local ranks; they checkpoint first)",
                cli.cancel_args, cli.cancel),
        Command("logs", "print (or --follow) a task's log", cli.logs_args, cli.logs),
        Command("sweep", "run a hyperparameter sweep file as one SLURM job array (or --local); `sweep report SWEEP`",
                cli.sweep_args, cli.sweep),
        Command("report", "evaluate every seed of a --seeds run on the test split: mean ± std per metric, a CSV",
                cli.report_args, cli.report),
        Command("config", "print a job resolved: base chain merged, --set applied, every default filled in",
                cli.config_args, cli.config),
        Command("clusters", "list the cluster profiles, the file each came from, and the default",
                cli.clusters_args, cli.clusters),
    )
}


def build_parser() -> argparse.ArgumentParser:
    return clikit.build_parser(PROG, DESCRIPTION, list(COMMANDS.values()))


def _broken(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    from launcher.runs import BrokenRunError

    return run_cli(PROG, DESCRIPTION, list(COMMANDS.values()), argv, errors={BrokenRunError: _broken})


if __name__ == "__main__":
    sys.exit(main())

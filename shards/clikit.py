"""One convention for the three command lines (``shards``, ``lenstrain``, ``launcher``).

Each CLI is a table of :class:`Command` rows; :func:`run_cli` builds the parser from it and turns a
:class:`UsageError` into one message on stderr and exit status 2. Problems with a dotted path (a config
key, an option) are printed by :func:`format_problems`, one per line, so every CLI reads the same.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shards.exitcodes import EXIT_USAGE

Problem = tuple[str, str]  # (dotted path, message)


class UsageError(ValueError):
    """Input that cannot be used; the message is for the user, verbatim. Exit status 2."""

    def __init__(self, message: str = "", problems: Sequence[Problem] = (), header: str = "invalid config"):
        self.problems = list(problems)
        self.header = header
        super().__init__(message or format_problems(self.problems, header))


def format_problems(problems: Sequence[Problem], header: str = "invalid config") -> str:
    """``header:`` then one ``  path: message`` line per problem."""
    return header + ":\n" + "\n".join(f"  {path}: {message}" for path, message in problems)


def fail(message: str) -> int:
    """Print a usage error and return its exit status."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one line of help, how to add its arguments, and what runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


@dataclass(frozen=True)
class Group:
    """A subcommand that only chooses among its own table of subcommands (``shards import deeplense|arrays``)."""

    name: str
    help: str
    commands: Sequence[Command | Group]
    description: str | None = None
    metavar: str = "COMMAND"


def _add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command | Group], dest: str,
                  metavar: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.description or command.help)
        if isinstance(command, Group):
            _add_commands(p, command.commands, f"{dest}_{command.name}", command.metavar)
        else:
            command.add_arguments(p)
            p.set_defaults(_run=command.run)


def build_parser(prog: str, description: str, commands: Sequence[Command | Group]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _add_commands(parser, commands, "command", "COMMAND")
    return parser


def run_cli(prog: str, description: str, commands: Sequence[Command | Group], argv: Sequence[str] | None = None,
            errors: dict[type[BaseException], Callable[[BaseException], int]] | None = None) -> int:
    """Parse ``argv``, run the chosen command and return its exit status.

    A :class:`UsageError` prints ``error: ...`` and returns 2; ``errors`` maps further exception types to
    handlers that print and return a status.
    """
    args = build_parser(prog, description, commands).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        return fail(str(exc))
    except tuple(errors or ()) as exc:  # type: ignore[misc]
        for kind, handler in (errors or {}).items():
            if isinstance(exc, kind):
                return handler(exc)
        raise

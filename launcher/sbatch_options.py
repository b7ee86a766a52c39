"""Site SLURM options: the checks behind ``resources.sbatch`` and the typed site fields of ``resources``.

``resources.sbatch: {option: value}`` passes any other ``sbatch`` long option through to the script's
``#SBATCH`` lines. Each key is checked against :data:`SBATCH_LONG_OPTIONS` (sbatch's long options, SLURM 22.05
to 24.11): an unknown one is refused with the closest matches (``difflib``). Options the launcher writes itself
(the signal, requeue, array, output and error files, ...) are refused with the reason, and options that have
a typed field in ``resources`` name that field. A value is a string, a number or ``true`` (a flag without a
value); ``false`` or ``null`` leaves the option out (so a job can drop what its ``base:`` set).

Every value that reaches an ``#SBATCH`` line is a single line of printable text: no newline, no control
character (:func:`check_sbatch_text`).
"""

from __future__ import annotations

import difflib
import re

# sbatch's long options (`man sbatch`, SLURM 22.05-24.11), without the leading dashes.
SBATCH_LONG_OPTIONS = frozenset(["account", "acctg-freq", "array", "batch", "bb", "bbf", "begin", "chdir", "cluster-constraint", "clusters", "comment", "constraint", "container", "container-id", "contiguous", "core-spec", "cores-per-socket", "cpu-freq", "cpus-per-gpu", "cpus-per-task", "deadline", "delay-boot", "dependency", "distribution", "error", "exclude", "exclusive", "export", "export-file", "extra", "extra-node-info", "get-user-env", "gid", "gpu-bind", "gpu-freq", "gpus", "gpus-per-node", "gpus-per-socket", "gpus-per-task", "gres", "gres-flags", "help", "hint", "hold", "ignore-pbs", "input", "job-name", "kill-on-invalid-dep", "licenses", "mail-type", "mail-user", "mcs-label", "mem", "mem-bind", "mem-per-cpu", "mem-per-gpu", "mincpus", "network", "nice", "no-kill", "no-requeue", "nodefile", "nodelist", "nodes", "ntasks", "ntasks-per-core", "ntasks-per-gpu", "ntasks-per-node", "ntasks-per-socket", "oom-kill-step", "open-mode", "output", "overcommit", "oversubscribe", "parsable", "partition", "power", "prefer", "priority", "profile", "propagate", "qos", "quiet", "reboot", "requeue", "reservation", "resv-ports", "segment", "signal", "sockets-per-node", "spread-job", "stepmgr", "switches", "test-only", "thread-spec", "threads-per-core", "time", "time-min", "tmp", "tres-bind", "tres-per-task", "uid", "usage", "use-min-nodes", "verbose", "version", "wait", "wait-all-nodes", "wckey", "wrap"])

# Options the launcher writes itself, and why a job may not set them.
LAUNCHER_OWNED = {
    "signal": "the launcher sends the profile's preempt_signal resources.signal_delay_s seconds before the time "
              "limit, and training checkpoints on it; set resources.signal_delay_s",
    "requeue": "the launcher always submits requeueable jobs; its own requeue logic counts resources.max_requeues",
    "no-requeue": "the launcher requeues preempted and timed-out runs itself (set resources.max_requeues: 0)",
    "array": "the launcher builds job arrays itself (launcher sweep, submit --seeds)",
    "output": "the launcher writes every task's log to RUN/submitit/ (launcher logs RUN shows it)",
    "error": "the launcher writes every task's log to RUN/submitit/ (launcher logs RUN --err shows it)",
    "open-mode": "the launcher appends to the logs of a requeued job",
    "job-name": "the job is named after the run (submit --name)",
    "dependency": "the launcher chains steps itself (submit --then eval,export)",
    "wrap": "the launcher writes the batch script",
    "parsable": "the launcher reads the job id from sbatch itself",
    "wait": "the launcher returns once the job is queued; watch it with launcher status",
    "test-only": "use submit --dry-run",
    "help": "not a job option",
    "usage": "not a job option",
    "version": "not a job option",
    "batch": "not supported by the launcher's batch script",
    "ntasks": "the launcher runs resources.nodes x resources.tasks_per_node tasks",
    "gpus": "one task drives one GPU: set resources.gpus_per_node (or resources.gres)",
    "gpus-per-task": "one task drives one GPU: set resources.gpus_per_node (or resources.gres)",
}

# Options with a typed field in ``resources``.
TYPED_FIELDS = {
    "nodes": "nodes",
    "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task",
    "mem": "mem",
    "time": "time",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "gpus-per-node": "gpus_per_node",
    "gres": "gres",
    "exclusive": "exclusive",
    "exclude": "exclude",
    "nodelist": "nodelist",
    "reservation": "reservation",
    "mail-type": "mail_type",
    "mail-user": "mail_user",
    "comment": "comment",
}

MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOSTLIST = re.compile(r"^[A-Za-z0-9_.,\[\]-]+$")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_GRES = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?::(?P<type>[A-Za-z0-9_.-]+))?(?::(?P<count>\d+))?$")


def check_sbatch_text(value: str, what: str = "value") -> str:
    """``value`` when it is one line of printable text (it goes onto an ``#SBATCH`` line); else ValueError."""
    if _CONTROL.search(value):
        raise ValueError(f"{value!r}: a {what} must be one line without control characters (it goes into the "
                         f"sbatch script)")
    if not value.strip():
        raise ValueError(f"a {what} must not be empty")
    return value


def check_hostlist(value: str) -> str:
    check_sbatch_text(value, "node list")
    if not _HOSTLIST.match(value):
        raise ValueError(f"{value!r} is not a SLURM node list (e.g. n[01-04],gpu17)")
    return value


def check_name(value: str, what: str) -> str:
    check_sbatch_text(value, what)
    if not _NAME.match(value):
        raise ValueError(f"{value!r}: a {what} is letters, digits and . _ + -")
    return value


def check_mail_type(value: str) -> str:
    check_sbatch_text(value, "mail type")
    bad = [t for t in (p.strip().upper() for p in value.split(",")) if t not in MAIL_TYPES]
    if bad:
        raise ValueError(f"unknown mail type {', '.join(map(repr, bad))}; valid choices (comma-separated): "
                         f"{', '.join(MAIL_TYPES)}")
    return ",".join(p.strip().upper() for p in value.split(","))


def check_mail_user(value: str) -> str:
    check_sbatch_text(value, "mail address")
    if " " in value.strip() or "@" not in value:
        raise ValueError(f"{value!r} is not a mail address")
    return value.strip()


def gres_gpus(gres: str) -> int | None:
    """The GPUs per node a ``--gres`` value asks for (``gpu:a100:4`` -> 4, ``gpu`` -> 1), None without ``gpu``."""
    for part in gres.split(","):
        match = _GRES.match(part.strip())
        if match and match.group("name") == "gpu":
            return int(match.group("count") or 1)
    return None


def check_gres(value: str) -> str:
    check_sbatch_text(value, "gres")
    for part in value.split(","):
        if not _GRES.match(part.strip()):
            raise ValueError(f"{part!r} is not a generic resource; expected NAME[:TYPE][:COUNT], e.g. gpu:a100:4")
    return value


def normalise_option(key: str) -> str:
    return key.strip().removeprefix("--").replace("_", "-").lower()


def option_problems(options: dict) -> list[str]:
    """Why each key (or value) of a ``resources.sbatch`` mapping cannot be used; empty when all can."""
    problems = []
    for key, value in options.items():
        if not isinstance(key, str):
            problems.append(f"{key!r}: an option is a name, e.g. gres-flags")
            continue
        name = normalise_option(key)
        if len(name) == 1:
            problems.append(f"{key!r}: give sbatch's long option name (e.g. nice, not -n)")
        elif name in LAUNCHER_OWNED:
            problems.append(f"{key!r} is set by the launcher: {LAUNCHER_OWNED[name]}")
        elif name in TYPED_FIELDS:
            problems.append(f"{key!r} has its own key: set resources.{TYPED_FIELDS[name]}")
        elif name not in SBATCH_LONG_OPTIONS:
            usable = sorted(SBATCH_LONG_OPTIONS - set(LAUNCHER_OWNED) - set(TYPED_FIELDS))
            close = difflib.get_close_matches(name, usable, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}" if close else "; see `man sbatch` for the long options"
            problems.append(f"{key!r} is not an sbatch option{hint}")
        elif isinstance(value, (dict, list)):
            problems.append(f"{key!r}: the value must be a string, a number, true (a flag) or false/null "
                            f"(left out), not {type(value).__name__}")
        elif isinstance(value, str):
            try:
                check_sbatch_text(value, f"value of {key!r}")
            except ValueError as exc:
                problems.append(str(exc))
    return problems


def sbatch_parameters(options: dict) -> dict:
    """``resources.sbatch`` as submitit's ``additional_parameters`` (checked keys, dashes, no false/null)."""
    return {normalise_option(k): v for k, v in options.items() if v is not None and v is not False}


def problems_message(problems: list[str], path: str) -> str:
    """Several problems of one field as one message that prints one line each under ``path``."""
    return f"\n  {path}: ".join(problems)



def checked_options(value: dict, path: str) -> dict:
    """``value``, an ``{option: value}`` map of a job's or a profile's ``sbatch``, when every option may be used;
    else a :class:`ValueError` naming each problem under ``path``."""
    problems = option_problems(value)
    if problems:
        raise ValueError(problems_message(problems, path))
    return value

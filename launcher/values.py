"""Values that reach the sbatch script, validated where they enter: a job file, ``--set``, a sweep's space, a
cluster profile.

Each value of an ``#SBATCH`` line is shell-quoted, but a newline ends its line all the same: what follows it
would be a line of the script (a command), and sbatch stops reading ``#SBATCH`` lines at the first command,
so the options after it would be dropped without a word. So every value that may reach the script is one
line of printable characters, checked by a pydantic type that names the key in its error (exit 2):

- :data:`SbatchValue`: any value of an ``#SBATCH`` option (``constraint``, ``comment``, ``mail_user``, a value
  of a free ``resources.sbatch`` map, ...): one line, no control characters, at most 1024 characters.
- :data:`SlurmNames`: a SLURM name, or a comma-separated list of them (``partition``, ``account``, ``qos``,
  ``reservation``, node lists): letters, digits and ``_ . + @ : - [ ]``.
- :data:`SbatchOption`: an ``#SBATCH`` option's name (a key of ``resources.sbatch``), e.g. ``mail-type``.
- :data:`ShellLine`: a ``setup:`` line, shell by design but one line, and no ``#SBATCH`` directive.
- :data:`RunName`: a run or sweep name (it names ``runs/NAME/`` and the SLURM job).

A new ``resources`` field that reaches the script takes one of these types and is covered.
:func:`script_problems` checks the parameters handed to submitit once more, as the last guard before
rendering: every string in them, the run directory included.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator

MAX_VALUE_CHARS = 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SLURM_NAME = r"[A-Za-z0-9_.+@:\[\]-]+"
_SLURM_NAMES = re.compile(rf"{_SLURM_NAME}(?:,{_SLURM_NAME})*")
_OPTION = re.compile(r"[a-z][a-z0-9-]*")


def control_character(text: str) -> str | None:
    """The first control or line-separating character in ``text``, described (``newline (U+000A)``), or None."""
    for char in text:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp") or char in "\u0085":
            name = {"\n": "newline", "\r": "carriage return", "\t": "tab", "\x00": "NUL"}.get(char)
            code = f"U+{ord(char):04X}"
            return f"{name} ({code})" if name else f"control character {code}"
    return None


def one_line(value: str, *, allow_tab: bool = False, what: str = "a value on an #SBATCH line") -> str:
    """``value`` if it is one line of printable text; else :class:`ValueError` saying which character."""
    found = control_character(value.replace("\t", "") if allow_tab else value)
    if found:
        raise ValueError(f"{value!r} holds a {found}; {what} must be one line without control characters")
    return value


def _sbatch_value(value: str) -> str:
    one_line(value)
    if not value.strip():
        raise ValueError("empty; give a value or leave the key out")
    if len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"{len(value)} characters; a value on an #SBATCH line has at most {MAX_VALUE_CHARS}")
    return value


def _slurm_names(value: str) -> str:
    _sbatch_value(value)
    if not _SLURM_NAMES.fullmatch(value):
        raise ValueError(f"{value!r} is not a SLURM name: use letters, digits and _ . + @ : - [ ] (a comma "
                         f"separates several, no spaces)")
    return value


def _option_name(value: str) -> str:
    one_line(value, what="an #SBATCH option's name")
    if not _OPTION.fullmatch(value):
        raise ValueError(f"{value!r} is not an #SBATCH option name (lower-case letters, digits and '-', e.g. "
                         f"mail-type)")
    return value


def _shell_line(value: str) -> str:
    one_line(value, allow_tab=True, what="a setup line")
    if value.lstrip().upper().startswith("#SBATCH"):
        raise ValueError(f"{value!r}: an #SBATCH directive after the first command is ignored by sbatch; set it "
                         f"through resources instead")
    return value


def _run_name(value: str) -> str:
    one_line(value, what="a run name")
    if not _NAME.fullmatch(value) or len(value) > 200:
        raise ValueError(f"{value!r}: use letters, digits, '_', '-' and '.' (it names runs/NAME/)")
    return value


SbatchValue = Annotated[str, AfterValidator(_sbatch_value)]
SlurmNames = Annotated[str, AfterValidator(_slurm_names)]
SbatchOption = Annotated[str, AfterValidator(_option_name)]
ShellLine = Annotated[str, AfterValidator(_shell_line)]
RunName = Annotated[str, AfterValidator(_run_name)]


def valid_run_name(value: str) -> bool:
    try:
        _run_name(value)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------ the last guard


def _strings(value: Any, key: str) -> Iterable[tuple[str, str]]:
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(str(k), f"{key} (an option's name)")
            yield from _strings(v, f"{key}.{k}")
    elif isinstance(value, list | tuple):
        for k, v in enumerate(value):
            yield from _strings(v, f"{key}[{k}]")


def script_problems(params: dict[str, Any], where: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(key, problem) for every string among submitit's parameters that is not one line of printable text.

    ``where`` maps a parameter to the key the user wrote (``account`` -> ``resources.account``)."""
    problems = []
    for name, value in params.items():
        for key, text in _strings(value, (where or {}).get(name, name)):
            found = control_character(text.replace("\t", "") if name in ("setup", "teardown") else text)
            if found:
                problems.append((key, f"{text!r} holds a {found}; a value in the sbatch script must be one line "
                                      f"without control characters"))
    return problems

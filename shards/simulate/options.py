"""The physics options of ``python -m shards simulate`` (the difficulty ladder), one per scenario knob."""

from __future__ import annotations

import argparse

from shards.simulate.scenarios import KNOBS, PRESETS, KnobError, check_knob, option_name


def _parse(name: str):
    kind = KNOBS[name].kind

    def parse(text: str):
        try:
            if kind == "range":
                parts = [float(p) for p in text.split(",")]
                value = parts if len(parts) == 2 else parts[0] if len(parts) == 1 else text
            elif kind in ("float", "int"):
                value = float(text)
            else:
                value = text
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {KNOBS[name].describe()}, got {text!r}") from None
        try:
            return check_knob(name, value)
        except KnobError as exc:
            detail = (
                exc.detail
                if exc.detail.startswith("must")
                else f"expected {KNOBS[name].describe()}, got {text!r}"
            )
            raise argparse.ArgumentTypeError(detail) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_physics_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "physics (the difficulty ladder)",
        "Override one knob of the preset's physics; every value is recorded in the manifest's source. "
        "Ranges are LOW,HIGH (drawn uniformly) or one value (fixed). Presets: "
        + "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()),
    )
    for name, knob in KNOBS.items():
        metavar = {"range": "LOW[,HIGH]", "float": "X", "int": "N"}.get(
            knob.kind, "{" + ",".join(knob.choices) + "}"
        )
        group.add_argument(
            option_name(name),
            dest=f"physics_{name}",
            type=_parse(name),
            default=None,
            metavar=metavar,
            help=f"{knob.help} ({knob.describe()})",
        )


def physics_overrides(args: argparse.Namespace) -> dict:
    """The knobs given on the command line, by name."""
    return {
        name: getattr(args, f"physics_{name}")
        for name in KNOBS
        if getattr(args, f"physics_{name}", None) is not None
    }

"""Simulation tasks: which substructure classes are drawn, and which labels become targets.

Every sample's JSON carries all of its parameters whatever the task; the task picks the classes
(sample ``i`` gets ``classes[i % len(classes)]``, so classes are balanced) and the manifest targets
(the primary one first; the others are recorded with their statistics for convenience).
"""

from __future__ import annotations

from dataclasses import dataclass

from shards.pack import TargetSpec


@dataclass(frozen=True)
class Task:
    name: str
    code: int  # part of every random stream, so tasks sharing a seed still draw different samples
    classes: tuple[str, ...]
    primary: TargetSpec
    secondary: tuple[TargetSpec, ...]
    description: str

    @property
    def targets(self) -> list[TargetSpec]:
        return [self.primary, *self.secondary]

    @property
    def regression(self) -> bool:
        return self.primary.kind == "regression"


_SUB3 = ("no_sub", "cdm", "vortex")
_HALO = TargetSpec("halo_mass", "regression")
_THETA = TargetSpec("einstein_radius", "regression")
_FSUB = TargetSpec("subhalo_fraction", "regression")
_HAS_SUB = TargetSpec("has_substructure", "classification", ["no_sub", "sub"])  # for binary (BCE) protocols

TASKS: dict[str, Task] = {
    "substructure": Task(
        name="substructure",
        code=1,
        classes=_SUB3,
        primary=TargetSpec("substructure", "classification", list(_SUB3)),
        secondary=(_HAS_SUB, _HALO, _THETA, _FSUB),
        description="classify the dark-matter substructure: no_sub / cdm / vortex (balanced)",
    ),
    "halo_mass": Task(
        name="halo_mass",
        code=2,
        classes=_SUB3,
        primary=_HALO,
        secondary=(_THETA, _FSUB, TargetSpec("substructure", "classification", list(_SUB3))),
        description="regress log10 of the main lens mass (M_sun); classes no_sub/cdm/vortex in turn",
    ),
    "axion_mass": Task(
        name="axion_mass",
        code=3,
        classes=("axion",),
        primary=TargetSpec("axion_mass", "regression"),
        secondary=(_HALO, _THETA, _FSUB),
        description="regress log10 of the axion mass (eV), axion class only",
    ),
    "subhalo_fraction": Task(
        name="subhalo_fraction",
        code=4,
        classes=("cdm",),
        primary=_FSUB,
        secondary=(_HALO, _THETA),
        description="regress the mass fraction in CDM subhalos, cdm class only",
    ),
}


class UnknownTaskError(ValueError):
    pass


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; valid choices: {', '.join(TASKS)}")
    return TASKS[name]

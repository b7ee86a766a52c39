"""Scenarios: the physical knobs of a simulated set, and the named presets that fix them.

A :class:`Physics` holds every distribution that decides how hard the substructure (or the halo mass)
is to see: the main lens (fixed like DeepLense's sets, or drawn), redshifts and the scatter between halo
mass and lensing mass, the source brightness, the exposure, the CDM subhalos and the vortex. A preset is
an instrument plus a Physics plus the way images are stored:

* ``deeplense1``, ``deeplense2``, ``deeplense3``: the physics of DeepLense's Model I, II and III (a fixed
  SIE of 1e12 M_sun with e1 = 0.1 and external shear gamma1 = 0.05, a magnitude-20 Sersic source of
  R = 0.25", n = 1 placed within +-0.35", 25 CDM point-mass subhalos of 1e6-1e10 M_sun (dN/dm ~ m^-0.9), a vortex line of
  100 point masses and 1e10 M_sun through the lens centre), each image divided by its maximum as their
  files are stored;
* ``model1``, ``euclid``, ``hst``: the realistic presets (every lens parameter drawn, faint sources, a
  1-5% substructure mass fraction), stored in e-/s per pixel.

Every knob can be overridden (``python -m shards simulate --preset deeplense2 --source-mag 22,24``);
:data:`KNOBS` gives each one's valid range, and :func:`with_overrides` checks them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from shards.simulate.presets import INSTRUMENTS, Instrument, get_instrument

Range = tuple[float, float]


@dataclass(frozen=True)
class Physics:
    """The distributions of one scenario. Ranges are (low, high), drawn uniformly; low == high is fixed."""

    lens: str = "drawn"  # "fixed": DeepLense's SIE + shear and source shape; "drawn": every parameter varies
    halo_mass: Range = (11.2, 12.1)  # log10 M/M_sun
    z_lens: Range = (0.5, 0.5)
    z_source: Range = (1.0, 1.0)
    mass_scatter: float = 0.0  # dex: lognormal scatter of the lensing mass around the halo mass
    source_mag: Range = (22.5, 24.5)  # unlensed AB magnitude
    exposure: Range | None = None  # seconds, log-uniform; None: the instrument's range
    subhalos: int | None = None  # CDM: this many subhalos of subhalo_mass; None: a mass fraction
    subhalo_mass: Range = (1e6, 1e10)  # M_sun, power law dN/dm ~ m^subhalo_slope (with subhalos)
    subhalo_slope: float = -0.9  # as DeepLenseSim's point-mass subhalos (with subhalos)
    subhalo_radius: Range = (0.25, 2.0)  # arcsec from the lens centre, uniform (with subhalos)
    subhalo_fraction: Range = (0.01, 0.05)  # M_sub / M (without subhalos; and the realistic vortex)
    vortex_mass: float | None = None  # M_sun: a line through the lens centre; None: a fraction-based string
    vortex_length: Range = (
        0.06,
        6.0,
    )  # arcsec, log-uniform (with vortex_mass): twice the de Broglie wavelength
    substructure_mass: str = (
        "taken"  # "taken" from the main lens (class-independent total), or "added" on top
    )
    scaling: str = "none"  # "max": each stored image divided by its maximum, as DeepLense's files
    lens_light: str = "none"  # "shmr": the lens galaxy's light, tied to the halo (see shards/simulate/light.py)
    fidelity: str = "physical"  # "replica": DeepLenseSim's own conventions (deeplense presets only)
    # Set by the replica fidelity, not options of their own:
    theta_e_convention: str = "angular"  # "deeplense": luminosity distances with D_ls = D_s - D_l
    noise: str = "ccd"  # "ccd": Poisson + sky + read noise; "deeplense1": Model I's recipe; "none"
    source_amp: float | None = None  # the Sersic amplitude itself (Model I's amp 20) instead of a magnitude
    double: bool = False  # the stored image is image + image, as DeepLenseSim's Model II/III

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Knob:
    """One overridable field of :class:`Physics`: its kind and valid range, for messages and checks."""

    kind: str  # "range", "float", "int", "choice"
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[str, ...] = ()
    help: str = ""

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        what = {"range": "LOW[,HIGH] in", "float": "a number in", "int": "an integer in"}[self.kind]
        return f"{what} [{self.low:g}, {self.high:g}]"


KNOBS: dict[str, Knob] = {
    "lens": Knob(
        "choice",
        choices=("fixed", "drawn"),
        help="main lens and source shape: DeepLense's fixed "
        'SIE (e1 0.1) + shear (gamma1 0.05), R=0.25" n=1 round source within +-0.35"; or all drawn',
    ),
    "halo_mass": Knob("range", 10.0, 13.0, help="log10 halo mass / M_sun"),
    "z_lens": Knob("range", 0.05, 3.0, help="lens redshift"),
    "z_source": Knob("range", 0.1, 6.0, help="source redshift (above the highest lens redshift)"),
    "mass_scatter": Knob(
        "float",
        0.0,
        1.0,
        help="dex of lognormal scatter between halo mass and lensing mass (concentration, mass-to-light)",
    ),
    "source_mag": Knob("range", 15.0, 30.0, help="unlensed source AB magnitude"),
    "exposure": Knob("range", 1.0, 1e6, help="exposure in seconds, log-uniform"),
    "subhalos": Knob("int", 1, 1000, help="CDM: exactly this many point-mass subhalos of --subhalo-mass"),
    "subhalo_mass": Knob("range", 1e4, 1e12, help="CDM subhalo masses in M_sun (power law, with --subhalos)"),
    "subhalo_slope": Knob("float", -3.0, 0.0, help="CDM: slope of dN/dm ~ m^slope (with --subhalos)"),
    "subhalo_radius": Knob("range", 0.0, 10.0, help="CDM subhalo distance from the lens centre, arcsec"),
    "subhalo_fraction": Knob("range", 0.0, 0.5, help="substructure mass fraction (without --subhalos)"),
    "vortex_mass": Knob(
        "float",
        1e6,
        1e12,
        help="vortex: a line of 100 point masses of this total M_sun through the lens centre",
    ),
    "vortex_length": Knob(
        "range",
        0.01,
        20.0,
        help="vortex line length in arcsec, log-uniform (with "
        "--vortex-mass): twice the de Broglie wavelength",
    ),
    "substructure_mass": Knob(
        "choice",
        choices=("taken", "added"),
        help="substructure mass taken from the main "
        "lens (the total lensing mass does not depend on the class), or added on top of it "
        "as DeepLenseSim does",
    ),
    "scaling": Knob(
        "choice", choices=("none", "max"), help="stored images: e-/s, or divided by their maximum"
    ),
    "lens_light": Knob(
        "choice",
        choices=("none", "shmr"),
        help="the lens galaxy's light: none, or a Sersic (n~4) whose stellar mass follows the halo "
        "(Moster+2013 stellar-to-halo-mass relation), size a mass-size relation and magnitude the "
        "luminosity distance (default shmr for halo_mass on the realistic presets, none elsewhere)",
    ),
    "fidelity": Knob(
        "choice",
        choices=("physical", "replica"),
        help="deeplense presets: physical (correct distances, our noise model) or replica (DeepLenseSim "
        "exactly: its Einstein-radius convention, 3e10 M_sun vortex, Model I's noise recipe, Model II/III "
        "noise-free and doubled, Model III's 0.08\" HST PSF)",
    ),
}


class KnobError(ValueError):
    """An override outside its valid range; the message names the option and the range."""

    def __init__(self, option: str, detail: str):
        super().__init__(f"{option}: {detail}" if option else detail)
        self.detail = detail


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_knob(name: str, value):
    """``value`` converted and checked against :data:`KNOBS` ``[name]``; raises :class:`KnobError`."""
    knob = KNOBS[name]
    bad = KnobError(option_name(name), f"expected {knob.describe()}, got {value!r}")
    if knob.kind == "choice":
        if value not in knob.choices:
            raise bad
        return value
    if knob.kind == "range":
        pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
        if len(pair) != 2 or not all(_number_in(v, knob) for v in pair) or pair[0] > pair[1]:
            raise bad
        return (float(pair[0]), float(pair[1]))
    if knob.kind == "int" and (isinstance(value, bool) or not float(value).is_integer()):
        raise bad
    if not _number_in(value, knob):
        raise bad
    return int(value) if knob.kind == "int" else float(value)


def _number_in(value, knob: Knob) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and knob.low <= value <= knob.high


def with_overrides(physics: Physics, overrides: dict) -> Physics:
    """``physics`` with ``overrides`` (knob name -> value) applied, each one checked."""
    unknown = sorted(set(overrides) - set(KNOBS))
    if unknown:
        raise KnobError("", f"unknown physics option(s) {', '.join(unknown)}; valid: {', '.join(KNOBS)}")
    checked = {name: check_knob(name, value) for name, value in overrides.items() if value is not None}
    out = dataclasses.replace(physics, **checked)
    if out.z_source[0] <= out.z_lens[1]:
        raise KnobError(
            "--z-source",
            f"must lie above --z-lens (lens up to {out.z_lens[1]:g}, source from {out.z_source[0]:g})",
        )
    return out


@dataclass(frozen=True)
class Preset:
    name: str
    instrument: str
    physics: Physics
    description: str


# DeepLense's common physics: fixed lens, bright source, 25 CDM subhalos, a 1e10 M_sun vortex line.
_DEEPLENSE = Physics(
    lens="fixed",
    halo_mass=(12.0, 12.0),
    source_mag=(20.0, 20.0),
    subhalos=25,
    vortex_mass=1e10,
    substructure_mass="added",
    scaling="max",
)
EUCLID_VIS_COADD = 4 * 565.0  # s: lenstronomy's Euclid VIS configuration, 4 exposures of 565 s

PRESETS: dict[str, Preset] = {
    "deeplense1": Preset(
        "deeplense1",
        "model1",
        dataclasses.replace(_DEEPLENSE, exposure=(180.0, 180.0)),
        'DeepLense Model I physics: 150x150 at 0.05"/px, 0.087" Gaussian PSF, peak S/N ~25',
    ),
    "deeplense2": Preset(
        "deeplense2",
        "euclid",
        dataclasses.replace(_DEEPLENSE, exposure=(EUCLID_VIS_COADD, EUCLID_VIS_COADD)),
        'DeepLense Model II physics: Euclid VIS 64x64 at 0.101"/px, 4 x 565 s',
    ),
    "deeplense3": Preset(
        "deeplense3",
        "hst",
        dataclasses.replace(_DEEPLENSE, exposure=(5400.0, 5400.0)),
        'DeepLense Model III physics: HST-like 64x64 at 0.08"/px, 5400 s',
    ),
    **{
        name: Preset(name, name, Physics(), f"realistic, {inst.description}")
        for name, inst in INSTRUMENTS.items()
    },
}

# The realistic halo_mass task breaks the one-to-one map from mass to ring size the way real lenses do, and
# shows the lens galaxy's light, which carries information on the halo beyond the ring.
REALISTIC_HALO_MASS = {"z_lens": (0.4, 0.7), "z_source": (1.2, 2.5), "mass_scatter": 0.2, "lens_light": "shmr"}

# What DeepLenseSim (deeplense/lens.py and the Model_I/II/III scripts) does differently from correct physics:
# (physics changes, instrument changes), by preset. Every one is tabled in shards/simulate/README.md.
_REPLICA_COMMON = {"theta_e_convention": "deeplense", "vortex_mass": 3e10}
REPLICAS: dict[str, tuple[dict, dict]] = {
    # simple_sim: Sersic amp 20, background rms 0.01, exposure 10^U(3, 3.5) s, Gaussian Poisson noise, then
    # Poisson counts of the noisy image again.
    "deeplense1": ({**_REPLICA_COMMON, "noise": "deeplense1", "source_amp": 20.0, "exposure": (1000.0, 3162.3)}, {}),
    # simple_sim_2 with lenstronomy's Euclid VIS: image_model + image_model, no noise.
    "deeplense2": ({**_REPLICA_COMMON, "noise": "none", "double": True}, {}),
    # simple_sim_2 with lenstronomy's HST WFC3/F160W (0.08" Gaussian PSF): no noise, doubled.
    "deeplense3": ({**_REPLICA_COMMON, "noise": "none", "double": True}, {"psf_fwhm": 0.08}),
}


class UnknownPresetError(ValueError):
    pass


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve(
    preset: str, task: str, overrides: dict, *, size: int | None = None, pixel_scale: float | None = None
) -> tuple[Instrument, Physics]:
    """The instrument and physics of ``preset`` for ``task`` with ``overrides`` applied."""
    spec = get_preset(preset)
    physics = spec.physics
    if task == "halo_mass" and physics.lens == "drawn":
        physics = dataclasses.replace(physics, **REALISTIC_HALO_MASS)
    instrument = get_instrument(spec.instrument, size=size, pixel_scale=pixel_scale)
    if overrides.get("fidelity") == "replica":
        if preset not in REPLICAS:
            raise KnobError(
                "--fidelity", f"replica exists for the presets {', '.join(REPLICAS)} only, not {preset!r}"
            )
        replica_physics, replica_instrument = REPLICAS[preset]
        physics = dataclasses.replace(physics, **replica_physics)
        instrument = dataclasses.replace(instrument, **replica_instrument)
    return instrument, with_overrides(physics, overrides)

"""Lensing physics: draw the parameters of one sample, then render its image with lenstronomy.

A sample is a pure function of ``(seed, task, index)`` and the scenario (:class:`~shards.simulate.
scenarios.Physics`). Four independent random streams are used:

* stream 0, the *shared* parameters (main lens, external shear, source, exposure), drawn from the
  same distributions whatever the substructure class, so no class differs in brightness or noise
  by construction;
* stream 1, the substructure (its mass fraction, masses and positions, the axion mass);
* stream 2, the pixel noise;
* stream 3, the lens population (redshifts, scatter of the lensing mass around the halo mass);
* stream 4, the lens galaxy's light (with ``lens_light: shmr``), so images without it are unchanged.

Units: angles in arcsec, masses in solar masses, images in e-/s per pixel (sky subtracted) unless the
scenario stores them divided by their maximum.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from shards.simulate.presets import Instrument
from shards.simulate.scenarios import Physics

# --- cosmology and default redshifts (as DeepLenseSim: flat LCDM, H0=70, Om0=0.3, z_l=0.5, z_s=1.0)
H0 = 70.0
OMEGA_M = 0.3
Z_LENS = 0.5
Z_SOURCE = 1.0

SUBSTRUCTURE_CLASSES = ("no_sub", "cdm", "vortex", "axion")

# --- realistic distributions (the defaults of Physics; all documented in README.md)
LOG_HALO_MASS = Physics.halo_mass  # log10 M/M_sun, uniform; theta_E from M (see einstein_radius)
LENS_AXIS_RATIO = (0.6, 1.0)  # SIE q, uniform; position angle uniform
LENS_CENTER_JITTER = 0.05  # arcsec, uniform in [-j, j] on each axis
SHEAR_MAX = 0.08  # external shear strength, uniform in [0, max]; angle uniform
SOURCE_OFFSET = 0.4  # source centre uniform in a disc of this radius, in units of theta_E
SOURCE_RADIUS = (0.1, 0.35)  # Sersic half-light radius, arcsec, uniform
SOURCE_INDEX = (0.8, 2.5)  # Sersic index, uniform
SOURCE_AXIS_RATIO = (0.5, 1.0)  # uniform; position angle uniform
SOURCE_MAGNITUDE = Physics.source_mag  # unlensed AB magnitude, uniform

SUBHALO_FRACTION = Physics.subhalo_fraction  # substructure mass / main lens mass, uniform (0 for no_sub)
ANNULUS = (0.5, 1.5)  # substructure lies in this annulus around the lens centre, units of theta_E
CDM_SLOPE = -1.9  # dN/dm ~ m^slope
CDM_MASS = (1e-4, 1e-2)  # subhalo mass range, in units of the main lens mass
CDM_MAX_SUBHALOS = 80
VORTEX_ELEMENTS = 30  # point masses along the vortex line
VORTEX_LENGTH = (0.6, 1.6)  # units of theta_E, uniform
VORTEX_RADIUS = (0.6, 1.2)  # distance of the vortex midpoint from the lens centre, units of theta_E
LOG_AXION_MASS = (-24.0, -22.0)  # log10 m_a/eV, uniform
AXION_VELOCITY = 200.0  # km/s, velocity in the de Broglie wavelength h / (m_a v)
AXION_GRANULES = (4, 48)  # min and max number of granules

# --- the fixed lens of DeepLense's sets (Physics.lens == "fixed")
FIXED_LENS_E1 = 0.1  # SIE ellipticity e1 (e2 = 0), centred
FIXED_SHEAR_GAMMA1 = 0.05  # external shear gamma1 (gamma2 = 0)
FIXED_SOURCE_BOX = 0.35  # arcsec: source centre uniform in [-b, b] on each axis
FIXED_SOURCE_RADIUS = 0.25  # arcsec, Sersic half-light radius of a round source
FIXED_SOURCE_INDEX = 1.0
FIXED_SOURCE_E = (-0.1, 0.1)  # source ellipticity (e1, e2)
DEEPLENSE_VORTEX_ELEMENTS = 100  # point masses along a vortex line through the lens centre

STREAM_SHARED, STREAM_SUBSTRUCTURE, STREAM_NOISE, STREAM_POPULATION, STREAM_LENS_LIGHT = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------------------------- scales
@lru_cache(maxsize=1)
def _cosmology():
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=H0, Om0=OMEGA_M)


@lru_cache(maxsize=1024)
def _distances_mpc(z_lens: float = Z_LENS, z_source: float = Z_SOURCE) -> tuple[float, float, float]:
    """Angular-diameter distances (D_l, D_s, D_ls) in Mpc; flat, so D_ls = (D_C(z_s) - D_C(z_l)) / (1 + z_s)."""
    cosmo = _cosmology()
    c_l, c_s = (float(d) for d in cosmo.comoving_distance([z_lens, z_source]).value)
    return c_l / (1 + z_lens), c_s / (1 + z_source), (c_s - c_l) / (1 + z_source)


@lru_cache(maxsize=1024)
def luminosity_distance_mpc(z: float) -> float:
    return float(_cosmology().luminosity_distance(z).value)


@lru_cache(maxsize=1024)
def theta_e_per_sqrt_msun(
    z_lens: float = Z_LENS, z_source: float = Z_SOURCE, convention: str = "angular"
) -> float:
    """Einstein radius (arcsec) of a point mass of 1 M_sun: theta_E^2 = 4 G M / c^2 * D_ls / (D_l D_s).

    ``convention="angular"`` uses angular-diameter distances (correct); ``"deeplense"`` reproduces
    DeepLenseSim's ``mass_to_radius``: luminosity distances, with D_ls = D_s - D_l (0.77 times the
    correct radius at z 0.5 / 1.0).
    """
    g, c, m_sun, mpc = 6.67430e-11, 299792458.0, 1.988409870698051e30, 3.0856775814913673e22
    if convention == "deeplense":
        d_l, d_s = luminosity_distance_mpc(z_lens), luminosity_distance_mpc(z_source)
        d_ls = d_s - d_l
    elif convention == "angular":
        d_l, d_s, d_ls = _distances_mpc(z_lens, z_source)
    else:
        raise ValueError(f"unknown Einstein-radius convention {convention!r}; valid: angular, deeplense")
    theta = math.sqrt(4 * g * m_sun / c**2 * d_ls / (d_l * d_s * mpc))
    return theta * 180 / math.pi * 3600


def einstein_radius(
    mass, z_lens: float = Z_LENS, z_source: float = Z_SOURCE, convention: str = "angular"
) -> np.ndarray | float:
    """theta_E (arcsec) of a lens of ``mass`` M_sun at ``z_lens`` for a source at ``z_source``.

    The main lens is an SIE whose mass inside the Einstein radius is ``mass`` (DeepLenseSim's
    convention: its "halo mass" of 1e12 M_sun sets theta_E this way). Subhalos use the same relation.
    """
    return theta_e_per_sqrt_msun(z_lens, z_source, convention) * np.sqrt(mass)


def arcsec_per_kpc(z_lens: float = Z_LENS) -> float:
    d_l, _, _ = _distances_mpc(z_lens, max(Z_SOURCE, z_lens + 0.5))
    return 1.0 / (d_l * 1e3 * math.pi / 180 / 3600)


def de_broglie_wavelength(axion_mass_ev: float, z_lens: float = Z_LENS) -> float:
    """lambda = h / (m_a v) at the lens, in arcsec (about 0.1" for 1e-22 eV and v = 200 km/s)."""
    h_c_ev_m = 1.23984198e-6  # h c in eV m
    kpc_m = 3.0856775814913673e19
    wavelength_m = h_c_ev_m / (axion_mass_ev * AXION_VELOCITY / 299792.458)
    return wavelength_m / kpc_m * arcsec_per_kpc(z_lens)


# --------------------------------------------------------------------------------------------- drawing
@dataclass(frozen=True)
class SimConfig:
    """What fixes a simulated set: each sample is a pure function of this and its index."""

    task: str
    classes: tuple[str, ...]
    instrument: Instrument
    seed: int
    task_code: int  # separates the random streams of different tasks with the same seed
    physics: Physics = Physics()
    preset: str = ""

    def class_of(self, index: int) -> str:
        return self.classes[index % len(self.classes)]


def _rng(config: SimConfig, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, config.task_code, index, stream])


def _ellipticity(phi: float, q: float) -> tuple[float, float]:
    e = (1 - q) / (1 + q)
    return e * math.cos(2 * phi), e * math.sin(2 * phi)


def _lerp(bounds, u: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * u


@dataclass
class Substructure:
    """Mass elements added to the main lens: POINT_MASS (theta_E) or GAUSSIAN convergence (amp, sigma)."""

    profile: str | None = None
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)  # M_sun
    sigma: list[float] = field(default_factory=list)  # arcsec, GAUSSIAN only


def _main_lens(phys: Physics, u: np.ndarray, population: np.random.Generator) -> dict:
    """Halo and lensing mass, redshifts, Einstein radius, SIE shape and position, external shear."""
    z_u = population.random(2)
    z_l, z_s = _lerp(phys.z_lens, z_u[0]), _lerp(phys.z_source, z_u[1])
    log_m = _lerp(phys.halo_mass, u[0])
    # Lognormal scatter of the lensing mass around the halo mass, truncated at 2 sigma (rings stay in the field).
    lensing_mass = 10.0 ** (log_m + phys.mass_scatter * float(np.clip(population.standard_normal(), -2, 2)))
    if phys.lens == "fixed":
        q, phi, lx, ly, gamma, gamma_phi = (
            (1 - FIXED_LENS_E1) / (1 + FIXED_LENS_E1),
            0.0,
            0.0,
            0.0,
            FIXED_SHEAR_GAMMA1,
            0.0,
        )
    else:
        q, phi = _lerp(LENS_AXIS_RATIO, u[1]), math.pi * u[2]
        lx, ly = LENS_CENTER_JITTER * (2 * u[3] - 1), LENS_CENTER_JITTER * (2 * u[4] - 1)
        gamma, gamma_phi = SHEAR_MAX * u[5], math.pi * u[6]
    e1, e2 = _ellipticity(phi, q)
    return {
        "z_lens": z_l,
        "z_source": z_s,
        "halo_mass": log_m,
        "lensing_mass": lensing_mass,
        "einstein_radius": float(einstein_radius(lensing_mass, z_l, z_s, phys.theta_e_convention)),
        "axis_ratio": q,
        "lens_angle": phi,
        "lens_e1": e1,
        "lens_e2": e2,
        "lens_x": lx,
        "lens_y": ly,
        "shear": gamma,
        "shear_angle": gamma_phi,
        "gamma1": gamma * math.cos(2 * gamma_phi),
        "gamma2": gamma * math.sin(2 * gamma_phi),
    }


def _source(phys: Physics, inst: Instrument, u: np.ndarray, lens: dict) -> dict:
    """The unlensed Sersic source: position, shape and flux."""
    if phys.lens == "fixed":
        sx, sy = FIXED_SOURCE_BOX * (2 * u[7] - 1), FIXED_SOURCE_BOX * (2 * u[8] - 1)
        s_radius, s_index, (s_e1, s_e2) = FIXED_SOURCE_RADIUS, FIXED_SOURCE_INDEX, FIXED_SOURCE_E
        e = math.hypot(s_e1, s_e2)
        s_q, s_phi = (1 - e) / (1 + e), 0.5 * math.atan2(s_e2, s_e1)
    else:
        r_src, a_src = SOURCE_OFFSET * lens["einstein_radius"] * math.sqrt(u[7]), 2 * math.pi * u[8]
        sx, sy = lens["lens_x"] + r_src * math.cos(a_src), lens["lens_y"] + r_src * math.sin(a_src)
        s_radius, s_index = _lerp(SOURCE_RADIUS, u[9]), _lerp(SOURCE_INDEX, u[10])
        s_q, s_phi = _lerp(SOURCE_AXIS_RATIO, u[11]), math.pi * u[12]
        s_e1, s_e2 = _ellipticity(s_phi, s_q)
    s_mag = _lerp(phys.source_mag, u[13])
    flux = 10 ** (-0.4 * (s_mag - inst.zero_point))  # e-/s
    if phys.source_amp is not None:  # DeepLenseSim's Model I sets the Sersic amplitude itself
        flux = phys.source_amp * _sersic_unit_flux(s_radius, s_index)
    return {
        "source_x": sx,
        "source_y": sy,
        "source_radius": s_radius,
        "source_index": s_index,
        "source_axis_ratio": s_q,
        "source_angle": s_phi,
        "source_e1": s_e1,
        "source_e2": s_e2,
        "source_magnitude": s_mag,
        "source_flux": flux,
    }


def draw_params(config: SimConfig, index: int) -> dict:
    """All parameters of sample ``index`` (JSON-serialisable); cheap, no rendering."""
    inst, phys = config.instrument, config.physics
    cls = config.class_of(index)
    u = _rng(config, index, STREAM_SHARED).random(16)  # fixed count: shared parameters never depend on the class
    lens = _main_lens(phys, u, _rng(config, index, STREAM_POPULATION))
    source = _source(phys, inst, u, lens)
    t_lo, t_hi = phys.exposure or inst.exposure
    exposure = math.exp(math.log(t_lo) + math.log(t_hi / t_lo) * u[14])
    sub, extra = _draw_substructure(cls, phys, _rng(config, index, STREAM_SUBSTRUCTURE), lens)
    fraction = float(sum(sub.mass) / lens["lensing_mass"]) if sub.mass else 0.0
    # "taken": the substructure takes its mass from the main lens, so the total lensing mass (and with it
    # the ring size and the mean magnification) does not depend on the class. "added": DeepLenseSim's
    # construction, the substructure on top of an unchanged main lens.
    sie_mass = lens["lensing_mass"] * (1.0 - fraction if phys.substructure_mass == "taken" else 1.0)
    sie_theta_e = float(einstein_radius(sie_mass, lens["z_lens"], lens["z_source"], phys.theta_e_convention))
    light = _lens_light(config, index, lens)
    return {
        "index": index, "seed": config.seed, "task": config.task, "preset": config.preset, "instrument": inst.name,
        "pixel_scale": inst.pixel_scale, "psf_fwhm": inst.psf_fwhm,
        **lens,
        "sie_einstein_radius": sie_theta_e, "theta_e_convention": phys.theta_e_convention,
        **source,
        **light,
        "exposure": exposure, "substructure": SUBSTRUCTURE_CLASSES.index(cls), "substructure_name": cls,
        "has_substructure": int(cls != "no_sub"), "subhalo_fraction": fraction, "n_subhalos": len(sub.mass),
        **extra,
        "subhalo_profile": sub.profile, "subhalo_x": sub.x, "subhalo_y": sub.y, "subhalo_mass": sub.mass,
        "subhalo_sigma": sub.sigma,
    }


def _lens_light(config: SimConfig, index: int, lens: dict) -> dict:
    """The lens galaxy's light (``lens_light: shmr``), from its own random stream; {} without it."""
    if config.physics.lens_light == "none":
        return {}
    from shards.simulate.light import draw_lens_light

    return draw_lens_light(
        lens,
        _rng(config, index, STREAM_LENS_LIGHT),
        luminosity_distance_mpc=luminosity_distance_mpc(lens["z_lens"]),
        arcsec_per_kpc=arcsec_per_kpc(lens["z_lens"]),
        zero_point=config.instrument.zero_point,
    )


def _annulus(rng: np.random.Generator, n: int, theta_e: float, cx: float, cy: float):
    r_in, r_out = ANNULUS[0] * theta_e, ANNULUS[1] * theta_e
    r = np.sqrt(r_in**2 + (r_out**2 - r_in**2) * rng.random(n))  # uniform in area
    a = 2 * np.pi * rng.random(n)
    return cx + r * np.cos(a), cy + r * np.sin(a)


def _power_law(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    k = slope + 1.0
    if abs(k) < 1e-9:  # dN/dm ~ 1/m: log-uniform
        return lo * (hi / lo) ** rng.random(n)
    return (lo**k + (hi**k - lo**k) * rng.random(n)) ** (1.0 / k)


def _power_law_mean(lo: float, hi: float, slope: float) -> float:
    k = slope + 1.0
    return ((hi ** (k + 1) - lo ** (k + 1)) / (k + 1)) / ((hi**k - lo**k) / k)


def _line(rng: np.random.Generator, n: int, total: float, length: float, cx: float, cy: float):
    """``n`` equal point masses summing to ``total`` on a line of ``length`` through (cx, cy), any angle."""
    angle = math.pi * rng.random()
    t = np.linspace(-0.5, 0.5, n) * length
    x, y = cx + t * math.cos(angle), cy + t * math.sin(angle)
    return Substructure("POINT_MASS", x.tolist(), y.tolist(), np.full(n, total / n).tolist()), angle


def _draw_substructure(cls: str, phys: Physics, rng: np.random.Generator, lens: dict):
    extra = {
        "axion_mass": None,
        "axion_mass_ev": None,
        "de_broglie_wavelength": None,
        "vortex_length": None,
        "vortex_angle": None,
    }
    if cls == "no_sub":
        return Substructure(), extra
    if cls == "cdm" and phys.subhalos is not None:
        return _counted_subhalos(phys, rng, lens), extra
    if cls in ("vortex", "axion") and phys.vortex_mass is not None:
        return _vortex_line(cls, phys, rng, lens, extra)
    mass, theta_e, cx, cy = lens["lensing_mass"], lens["einstein_radius"], lens["lens_x"], lens["lens_y"]
    total = _lerp(phys.subhalo_fraction, rng.random()) * mass
    if cls == "cdm":
        lo, hi = CDM_MASS[0] * mass, CDM_MASS[1] * mass
        n = int(np.clip(rng.poisson(total / _power_law_mean(lo, hi, CDM_SLOPE)), 1, CDM_MAX_SUBHALOS))
        m = _power_law(rng, n, lo, hi, CDM_SLOPE)
        m *= total / m.sum()  # the drawn fraction holds exactly; the relative masses follow the power law
        x, y = _annulus(rng, n, theta_e, cx, cy)
        return Substructure("POINT_MASS", x.tolist(), y.tolist(), m.tolist()), extra
    if cls == "vortex":
        length = theta_e * _lerp(VORTEX_LENGTH, rng.random())
        r = theta_e * _lerp(VORTEX_RADIUS, rng.random())
        a = 2 * math.pi * rng.random()
        sub, angle = _line(rng, VORTEX_ELEMENTS, total, length, cx + r * math.cos(a), cy + r * math.sin(a))
        extra.update(vortex_length=length, vortex_angle=angle)
        return sub, extra
    if cls == "axion":
        return _granules(rng, total, lens, extra)
    raise ValueError(f"unknown substructure class {cls!r}; valid: {', '.join(SUBSTRUCTURE_CLASSES)}")


def _counted_subhalos(phys: Physics, rng: np.random.Generator, lens: dict) -> Substructure:
    """DeepLense's CDM: a fixed number of point masses from the power law, at radii uniform in a range."""
    n = phys.subhalos
    m = _power_law(rng, n, *phys.subhalo_mass, phys.subhalo_slope)
    r = phys.subhalo_radius[0] + (phys.subhalo_radius[1] - phys.subhalo_radius[0]) * rng.random(n)
    a = 2 * np.pi * rng.random(n)
    x, y = lens["lens_x"] + r * np.cos(a), lens["lens_y"] + r * np.sin(a)
    return Substructure("POINT_MASS", x.tolist(), y.tolist(), m.tolist())


def _vortex_line(cls: str, phys: Physics, rng: np.random.Generator, lens: dict, extra: dict):
    """DeepLense's vortex: 100 point masses of vortex_mass in all on a line through the lens centre, at a
    uniform angle. Its length is log-uniform in vortex_length (DeepLenseSim: from -lambda to +lambda, the de
    Broglie wavelength of an axion mass log-uniform in 1e-24..1e-22 eV, so 0.06"-6"); for the axion class it
    is twice the de Broglie wavelength of an axion mass drawn log-uniform."""
    lo, hi = phys.vortex_length
    length = lo * (hi / lo) ** rng.random()
    if cls == "axion":
        log_ma = _lerp(LOG_AXION_MASS, rng.random())
        wavelength = de_broglie_wavelength(10.0**log_ma, lens["z_lens"])
        length = 2 * wavelength
        extra.update(axion_mass=log_ma, axion_mass_ev=10.0**log_ma, de_broglie_wavelength=wavelength)
    sub, angle = _line(
        rng, DEEPLENSE_VORTEX_ELEMENTS, phys.vortex_mass, length, lens["lens_x"], lens["lens_y"]
    )
    extra.update(vortex_length=length, vortex_angle=angle)
    return sub, extra


def _granules(rng: np.random.Generator, total: float, lens: dict, extra: dict):
    """Axion wave interference as granules: GAUSSIAN clumps of FWHM lambda/2 filling the annulus."""
    log_ma = _lerp(LOG_AXION_MASS, rng.random())
    wavelength = de_broglie_wavelength(10.0**log_ma, lens["z_lens"])
    sigma = wavelength / 2 / (2 * math.sqrt(2 * math.log(2)))
    theta_e = lens["einstein_radius"]
    area = math.pi * (ANNULUS[1] ** 2 - ANNULUS[0] ** 2) * theta_e**2
    n = int(np.clip(round(area / (math.pi * (wavelength / 2) ** 2)), *AXION_GRANULES))
    x, y = _annulus(rng, n, theta_e, lens["lens_x"], lens["lens_y"])
    m = total / n * rng.uniform(0.5, 1.5, n)
    m *= total / m.sum()
    extra.update(axion_mass=log_ma, axion_mass_ev=10.0**log_ma, de_broglie_wavelength=wavelength)
    return Substructure("GAUSSIAN", x.tolist(), y.tolist(), m.tolist(), [sigma] * n), extra


def smooth_twin(params: dict) -> dict:
    """The same sample without substructure, everything else equal: the substructure's mass goes back
    into the main lens when it was taken from it, and is simply gone when it was added on top.

    Rendering it gives the smooth-lens counterpart of an image; its residual is the substructure's signal.
    """
    return {
        **params,
        "subhalo_profile": None,
        "subhalo_x": [],
        "subhalo_y": [],
        "subhalo_mass": [],
        "subhalo_sigma": [],
        "sie_einstein_radius": params["einstein_radius"],
    }


# --------------------------------------------------------------------------------------------- rendering
def lenstronomy_kwargs(params: dict) -> tuple[list[str], list[dict], list[str], list[dict]]:
    """The lenstronomy model lists and keyword arguments of a sample: (lens models, kwargs_lens,
    source models, kwargs_source)."""
    lens_models = ["SIE", "SHEAR"]
    kwargs_lens = [
        {"theta_E": params["sie_einstein_radius"], "e1": params["lens_e1"], "e2": params["lens_e2"],
         "center_x": params["lens_x"], "center_y": params["lens_y"]},
        {"gamma1": params["gamma1"], "gamma2": params["gamma2"], "ra_0": params["lens_x"], "dec_0": params["lens_y"]},
    ]
    profile = params["subhalo_profile"]
    theta = einstein_radius(np.asarray(params["subhalo_mass"]), params["z_lens"], params["z_source"],
                            params.get("theta_e_convention", "angular"))
    if profile == "POINT_MASS":
        for x, y, t in zip(params["subhalo_x"], params["subhalo_y"], theta.tolist(), strict=True):
            lens_models.append("POINT_MASS")
            kwargs_lens.append({"theta_E": t, "center_x": x, "center_y": y})
    elif profile == "GAUSSIAN":
        # A Gaussian convergence of total lensing mass pi theta_E^2 deflects like a point mass far away.
        for x, y, t, s in zip(
            params["subhalo_x"], params["subhalo_y"], theta.tolist(), params["subhalo_sigma"], strict=True
        ):
            lens_models.append("GAUSSIAN")
            kwargs_lens.append({"amp": math.pi * t * t, "sigma": s, "center_x": x, "center_y": y})
    kwargs_source = [{
        "amp": params["source_flux"] / _sersic_unit_flux(params["source_radius"], params["source_index"]),
        "R_sersic": params["source_radius"], "n_sersic": params["source_index"], "e1": params["source_e1"],
        "e2": params["source_e2"], "center_x": params["source_x"], "center_y": params["source_y"],
    }]
    return lens_models, kwargs_lens, ["SERSIC_ELLIPSE"], kwargs_source


def lens_light_kwargs(params: dict) -> tuple[list[str], list[dict]]:
    """The lenstronomy lens-light models and keyword arguments of a sample (none without lens light)."""
    if "lens_light_flux" not in params:
        return [], []
    r, n = params["lens_reff"], params["lens_light_index"]
    return ["SERSIC_ELLIPSE"], [
        {
            "amp": params["lens_light_flux"] / _sersic_unit_flux(r, n),
            "R_sersic": r,
            "n_sersic": n,
            "e1": params["lens_light_e1"],
            "e2": params["lens_light_e2"],
            "center_x": params["lens_x"],
            "center_y": params["lens_y"],
        }
    ]


def _sersic_unit_flux(r_sersic: float, n: float) -> float:
    """Total flux of lenstronomy's SERSIC_ELLIPSE with amp=1 (its amp is the surface brightness at R_sersic)."""
    from scipy.special import gamma as gamma_fn

    b = _sersic_b(n)
    return 2 * math.pi * n * r_sersic**2 * math.exp(b) * b ** (-2 * n) * gamma_fn(2 * n)


def _sersic_b(n: float) -> float:
    from lenstronomy.LensModel.Profiles.sersic_utils import SersicUtil

    return float(SersicUtil.b_n(n))


_MODEL_CACHE: OrderedDict = OrderedDict()
_MODEL_CACHE_SIZE = 128


def image_model(
    instrument: Instrument, lens_models: list[str], source_models: list[str], light_models: tuple[str, ...] = ()
):
    """A lenstronomy ImageModel for this grid and these profiles, built once per process and reused."""
    key = (instrument, tuple(lens_models), tuple(source_models), tuple(light_models))
    model = _MODEL_CACHE.get(key)
    if model is not None:
        _MODEL_CACHE.move_to_end(key)
        return model
    model = build_image_model(instrument, lens_models, source_models, light_models)
    _MODEL_CACHE[key] = model
    if len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
        _MODEL_CACHE.popitem(last=False)
    return model


def build_image_model(
    instrument: Instrument, lens_models: list[str], source_models: list[str], light_models=()
):
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import util

    n, scale = instrument.size, instrument.pixel_scale
    _, _, ra0, dec0, _, _, pix2angle, _ = util.make_grid_with_coordtransform(
        num_pix=n, delta_pix=scale, center_ra=0, center_dec=0, subgrid_res=1, inverse=False
    )
    data = ImageData(
        image_data=np.zeros((n, n)), ra_at_xy_0=ra0, dec_at_xy_0=dec0, transform_pix2angle=pix2angle
    )
    psf = PSF(psf_type="GAUSSIAN", fwhm=instrument.psf_fwhm, truncation=3)
    return ImageModel(
        data,
        psf,
        lens_model_class=LensModel(lens_models),
        source_model_class=LightModel(source_models),
        lens_light_model_class=LightModel(list(light_models)) if light_models else None,
        kwargs_numerics={"supersampling_factor": 1, "supersampling_convolution": False},
    )


def noise_sigma(clean: np.ndarray, instrument: Instrument, exposure: float) -> np.ndarray:
    """Per-pixel noise standard deviation (e-/s) of a sky-subtracted image of ``exposure`` seconds."""
    floor = instrument.sky_per_pixel + instrument.num_reads * instrument.read_noise**2 / exposure
    variance = np.maximum(clean, 0)
    variance += clean.dtype.type(floor)
    variance *= clean.dtype.type(1.0 / exposure)
    return np.sqrt(variance, out=variance)


def render_clean(config: SimConfig, params: dict) -> np.ndarray:
    """The noise-free image (H, W) in e-/s per pixel, float64."""
    lens_models, kwargs_lens, source_models, kwargs_source = lenstronomy_kwargs(params)
    light_models, kwargs_light = lens_light_kwargs(params)
    model = image_model(config.instrument, lens_models, source_models, tuple(light_models))
    if not light_models:
        return model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source)
    return model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source, kwargs_lens_light=kwargs_light)


def render(config: SimConfig, params: dict) -> np.ndarray:
    """The observed image (1, H, W) float32: lensed source convolved with the PSF, plus noise.

    The noise is Gaussian with the Poisson + sky + read-noise variance (the Gaussian limit of Poisson
    counts, as lenstronomy's own ``add_poisson``), drawn in float32 from its own stream.
    """
    clean = render_clean(config, params).astype(np.float32)
    seq = np.random.SeedSequence([config.seed, config.task_code, params["index"], STREAM_NOISE])
    rng = np.random.Generator(np.random.SFC64(seq))
    recipe = config.physics.noise
    if recipe == "none":  # DeepLenseSim's Model II/III: the noise-free model, doubled
        return (clean + clean if config.physics.double else clean)[None]
    if recipe == "deeplense1":
        return _deeplense1_noise(clean, params["exposure"], rng)[None]
    noise = rng.standard_normal(clean.shape, dtype=np.float32)
    noise *= noise_sigma(clean, config.instrument, params["exposure"])
    noise += clean
    return noise[None]


DEEPLENSE1_BACKGROUND_RMS = 0.01


def _deeplense1_noise(clean: np.ndarray, exposure: float, rng: np.random.Generator) -> np.ndarray:
    """DeepLenseSim's Model I recipe (``simple_sim``), noise applied twice: Gaussian Poisson noise of
    sqrt(|I| / t) and a background of rms 0.01, both scaled to counts by the exposure t, then Poisson
    counts drawn from the (clipped) noisy image. Returns counts, as their files hold them."""
    poisson = rng.standard_normal(clean.shape) * np.sqrt(np.abs(clean) / exposure)
    background = rng.standard_normal(clean.shape) * DEEPLENSE1_BACKGROUND_RMS
    counts = exposure * (clean + poisson + background)
    return rng.poisson(np.clip(counts, 0, None)).astype(np.float32)


@dataclass(frozen=True)
class Simulator:
    """The picklable sample function handed to the packer: index -> (image, labels)."""

    config: SimConfig

    def __call__(self, index: int) -> tuple[np.ndarray, dict]:
        params = draw_params(self.config, index)
        image = render(self.config, params)
        if self.config.physics.scaling == "max":  # as DeepLense's files: each image divided by its maximum
            image /= max(float(image.max()), np.finfo(np.float32).tiny)
        return image, params

"""Lensing physics: draw the parameters of one sample, then render its image with lenstronomy.

A sample is a pure function of ``(seed, task, index)``. Three independent random streams are used:

* stream 0, the *shared* parameters (main lens, external shear, source, exposure), drawn from the
  same distributions whatever the substructure class, so no class differs in brightness or noise
  by construction;
* stream 1, the substructure (its mass fraction, masses and positions, the axion mass);
* stream 2, the pixel noise.

Units: angles in arcsec, masses in solar masses, images in e-/s per pixel (sky subtracted).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from shards.simulate.presets import Instrument

# --- fixed cosmology and redshifts (as DeepLenseSim: flat LCDM, H0=70, Om0=0.3, z_l=0.5, z_s=1.0)
H0 = 70.0
OMEGA_M = 0.3
Z_LENS = 0.5
Z_SOURCE = 1.0

SUBSTRUCTURE_CLASSES = ("no_sub", "cdm", "vortex", "axion")

# --- distributions (all documented in README.md)
LOG_HALO_MASS = (11.2, 12.1)  # log10 M/M_sun, uniform; theta_E from M (see einstein_radius)
LENS_AXIS_RATIO = (0.6, 1.0)  # SIE q, uniform; position angle uniform
LENS_CENTER_JITTER = 0.05  # arcsec, uniform in [-j, j] on each axis
SHEAR_MAX = 0.08  # external shear strength, uniform in [0, max]; angle uniform
SOURCE_OFFSET = 0.4  # source centre uniform in a disc of this radius, in units of theta_E
SOURCE_RADIUS = (0.1, 0.35)  # Sersic half-light radius, arcsec, uniform
SOURCE_INDEX = (0.8, 2.5)  # Sersic index, uniform
SOURCE_AXIS_RATIO = (0.5, 1.0)  # uniform; position angle uniform
SOURCE_MAGNITUDE = (22.5, 24.5)  # unlensed AB magnitude, uniform

SUBHALO_FRACTION = (0.01, 0.05)  # substructure mass / main lens mass, uniform (0 for no_sub)
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

STREAM_SHARED, STREAM_SUBSTRUCTURE, STREAM_NOISE = 0, 1, 2


# --------------------------------------------------------------------------------------------- scales
@lru_cache(maxsize=1)
def _distances_mpc() -> tuple[float, float, float]:
    from astropy.cosmology import FlatLambdaCDM

    cosmo = FlatLambdaCDM(H0=H0, Om0=OMEGA_M)
    d_l = cosmo.angular_diameter_distance(Z_LENS).value
    d_s = cosmo.angular_diameter_distance(Z_SOURCE).value
    d_ls = cosmo.angular_diameter_distance_z1z2(Z_LENS, Z_SOURCE).value
    return float(d_l), float(d_s), float(d_ls)


@lru_cache(maxsize=1)
def theta_e_per_sqrt_msun() -> float:
    """Einstein radius (arcsec) of a point mass of 1 M_sun: theta_E^2 = 4 G M / c^2 * D_ls / (D_l D_s)."""
    g, c, m_sun, mpc = 6.67430e-11, 299792458.0, 1.988409870698051e30, 3.0856775814913673e22
    d_l, d_s, d_ls = _distances_mpc()
    theta = math.sqrt(4 * g * m_sun / c**2 * d_ls / (d_l * d_s * mpc))
    return theta * 180 / math.pi * 3600


def einstein_radius(mass) -> np.ndarray | float:
    """Einstein radius in arcsec of the lensing mass ``mass`` (M_sun) at z_l for a source at z_s.

    The main lens is an SIE whose mass inside the Einstein radius is ``mass`` (DeepLenseSim's
    convention: its "halo mass" of 1e12 M_sun sets theta_E this way). Subhalos use the same relation.
    """
    return theta_e_per_sqrt_msun() * np.sqrt(mass)


def arcsec_per_kpc() -> float:
    d_l, _, _ = _distances_mpc()
    return 1.0 / (d_l * 1e3 * math.pi / 180 / 3600)


def de_broglie_wavelength(axion_mass_ev: float) -> float:
    """lambda = h / (m_a v) at the lens, in arcsec (about 0.1" for 1e-22 eV and v = 200 km/s)."""
    h_c_ev_m = 1.23984198e-6  # h c in eV m
    kpc_m = 3.0856775814913673e19
    wavelength_m = h_c_ev_m / (axion_mass_ev * AXION_VELOCITY / 299792.458)
    return wavelength_m / kpc_m * arcsec_per_kpc()


# --------------------------------------------------------------------------------------------- drawing
@dataclass(frozen=True)
class SimConfig:
    """What fixes a simulated set: each sample is a pure function of this and its index."""

    task: str
    classes: tuple[str, ...]
    instrument: Instrument
    seed: int
    task_code: int  # separates the random streams of different tasks with the same seed

    def class_of(self, index: int) -> str:
        return self.classes[index % len(self.classes)]


def _rng(config: SimConfig, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, config.task_code, index, stream])


def _ellipticity(phi: float, q: float) -> tuple[float, float]:
    e = (1 - q) / (1 + q)
    return e * math.cos(2 * phi), e * math.sin(2 * phi)


@dataclass
class Substructure:
    """Mass elements added to the main lens: POINT_MASS (theta_E) or GAUSSIAN convergence (amp, sigma)."""

    profile: str | None = None
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)  # M_sun
    sigma: list[float] = field(default_factory=list)  # arcsec, GAUSSIAN only


def draw_params(config: SimConfig, index: int) -> dict:
    """All parameters of sample ``index`` (JSON-serialisable); cheap, no rendering."""
    inst = config.instrument
    cls = config.class_of(index)
    rng = _rng(config, index, STREAM_SHARED)
    u = rng.random(16)  # fixed number of draws: the shared parameters never depend on the class

    log_m = LOG_HALO_MASS[0] + (LOG_HALO_MASS[1] - LOG_HALO_MASS[0]) * u[0]
    mass = 10.0**log_m
    theta_e = float(einstein_radius(mass))
    q = LENS_AXIS_RATIO[0] + (LENS_AXIS_RATIO[1] - LENS_AXIS_RATIO[0]) * u[1]
    phi = math.pi * u[2]
    e1, e2 = _ellipticity(phi, q)
    lx, ly = LENS_CENTER_JITTER * (2 * u[3] - 1), LENS_CENTER_JITTER * (2 * u[4] - 1)
    gamma = SHEAR_MAX * u[5]
    gamma_phi = math.pi * u[6]
    g1, g2 = gamma * math.cos(2 * gamma_phi), gamma * math.sin(2 * gamma_phi)

    r_src = SOURCE_OFFSET * theta_e * math.sqrt(u[7])
    a_src = 2 * math.pi * u[8]
    sx, sy = lx + r_src * math.cos(a_src), ly + r_src * math.sin(a_src)
    s_radius = SOURCE_RADIUS[0] + (SOURCE_RADIUS[1] - SOURCE_RADIUS[0]) * u[9]
    s_index = SOURCE_INDEX[0] + (SOURCE_INDEX[1] - SOURCE_INDEX[0]) * u[10]
    s_q = SOURCE_AXIS_RATIO[0] + (SOURCE_AXIS_RATIO[1] - SOURCE_AXIS_RATIO[0]) * u[11]
    s_phi = math.pi * u[12]
    s_e1, s_e2 = _ellipticity(s_phi, s_q)
    s_mag = SOURCE_MAGNITUDE[0] + (SOURCE_MAGNITUDE[1] - SOURCE_MAGNITUDE[0]) * u[13]
    s_flux = 10 ** (-0.4 * (s_mag - inst.zero_point))  # e-/s
    exposure = math.exp(math.log(inst.exposure[0]) + math.log(inst.exposure[1] / inst.exposure[0]) * u[14])

    sub, extra = _draw_substructure(cls, _rng(config, index, STREAM_SUBSTRUCTURE), mass, theta_e, lx, ly)
    fraction = float(sum(sub.mass) / mass) if sub.mass else 0.0
    # The substructure takes its mass from the main lens, so the total lensing mass (and with it the
    # ring size and the mean magnification) does not depend on the class.
    sie_theta_e = float(einstein_radius(mass * (1.0 - fraction)))
    return {
        "index": index,
        "seed": config.seed,
        "task": config.task,
        "instrument": inst.name,
        "pixel_scale": inst.pixel_scale,
        "psf_fwhm": inst.psf_fwhm,
        "z_lens": Z_LENS,
        "z_source": Z_SOURCE,
        "halo_mass": log_m,
        "einstein_radius": theta_e,
        "sie_einstein_radius": sie_theta_e,
        "axis_ratio": q,
        "lens_angle": phi,
        "lens_e1": e1,
        "lens_e2": e2,
        "lens_x": lx,
        "lens_y": ly,
        "shear": gamma,
        "shear_angle": gamma_phi,
        "gamma1": g1,
        "gamma2": g2,
        "source_x": sx,
        "source_y": sy,
        "source_radius": s_radius,
        "source_index": s_index,
        "source_axis_ratio": s_q,
        "source_angle": s_phi,
        "source_e1": s_e1,
        "source_e2": s_e2,
        "source_magnitude": s_mag,
        "source_flux": s_flux,
        "exposure": exposure,
        "substructure": SUBSTRUCTURE_CLASSES.index(cls),
        "substructure_name": cls,
        "has_substructure": int(cls != "no_sub"),
        "subhalo_fraction": fraction,
        "n_subhalos": len(sub.mass),
        **extra,
        "subhalo_profile": sub.profile,
        "subhalo_x": sub.x,
        "subhalo_y": sub.y,
        "subhalo_mass": sub.mass,
        "subhalo_sigma": sub.sigma,
    }


def _annulus(rng: np.random.Generator, n: int, theta_e: float, cx: float, cy: float):
    r_in, r_out = ANNULUS[0] * theta_e, ANNULUS[1] * theta_e
    r = np.sqrt(r_in**2 + (r_out**2 - r_in**2) * rng.random(n))  # uniform in area
    a = 2 * np.pi * rng.random(n)
    return cx + r * np.cos(a), cy + r * np.sin(a)


def _power_law(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    k = slope + 1.0
    return (lo**k + (hi**k - lo**k) * rng.random(n)) ** (1.0 / k)


def _power_law_mean(lo: float, hi: float, slope: float) -> float:
    k = slope + 1.0
    return ((hi ** (k + 1) - lo ** (k + 1)) / (k + 1)) / ((hi**k - lo**k) / k)


def _draw_substructure(cls: str, rng: np.random.Generator, mass: float, theta_e: float, cx: float, cy: float):
    extra = {"axion_mass": None, "axion_mass_ev": None, "de_broglie_wavelength": None,
             "vortex_length": None, "vortex_angle": None}
    if cls == "no_sub":
        return Substructure(), extra
    f_target = SUBHALO_FRACTION[0] + (SUBHALO_FRACTION[1] - SUBHALO_FRACTION[0]) * rng.random()
    total = f_target * mass
    if cls == "cdm":
        lo, hi = CDM_MASS[0] * mass, CDM_MASS[1] * mass
        n = int(np.clip(rng.poisson(total / _power_law_mean(lo, hi, CDM_SLOPE)), 1, CDM_MAX_SUBHALOS))
        m = _power_law(rng, n, lo, hi, CDM_SLOPE)
        m *= total / m.sum()  # the drawn fraction holds exactly; the relative masses follow the power law
        x, y = _annulus(rng, n, theta_e, cx, cy)
        return Substructure("POINT_MASS", x.tolist(), y.tolist(), m.tolist()), extra
    if cls == "vortex":
        length = theta_e * (VORTEX_LENGTH[0] + (VORTEX_LENGTH[1] - VORTEX_LENGTH[0]) * rng.random())
        r = theta_e * (VORTEX_RADIUS[0] + (VORTEX_RADIUS[1] - VORTEX_RADIUS[0]) * rng.random())
        a, angle = 2 * math.pi * rng.random(), math.pi * rng.random()
        t = np.linspace(-0.5, 0.5, VORTEX_ELEMENTS) * length
        x = cx + r * math.cos(a) + t * math.cos(angle)
        y = cy + r * math.sin(a) + t * math.sin(angle)
        m = np.full(VORTEX_ELEMENTS, total / VORTEX_ELEMENTS)
        extra.update(vortex_length=length, vortex_angle=angle)
        return Substructure("POINT_MASS", x.tolist(), y.tolist(), m.tolist()), extra
    if cls == "axion":
        log_ma = LOG_AXION_MASS[0] + (LOG_AXION_MASS[1] - LOG_AXION_MASS[0]) * rng.random()
        wavelength = de_broglie_wavelength(10.0**log_ma)
        # Granules: interference maxima of FWHM lambda/2, filling the annulus up to a maximum count.
        sigma = wavelength / 2 / (2 * math.sqrt(2 * math.log(2)))
        area = math.pi * (ANNULUS[1] ** 2 - ANNULUS[0] ** 2) * theta_e**2
        n = int(np.clip(round(area / (math.pi * (wavelength / 2) ** 2)), *AXION_GRANULES))
        x, y = _annulus(rng, n, theta_e, cx, cy)
        m = total / n * rng.uniform(0.5, 1.5, n)
        m *= total / m.sum()
        extra.update(axion_mass=log_ma, axion_mass_ev=10.0**log_ma, de_broglie_wavelength=wavelength)
        return Substructure("GAUSSIAN", x.tolist(), y.tolist(), m.tolist(), [sigma] * n), extra
    raise ValueError(f"unknown substructure class {cls!r}; valid: {', '.join(SUBSTRUCTURE_CLASSES)}")


def smooth_twin(params: dict) -> dict:
    """The same sample without substructure: its mass back in the main lens, everything else equal.

    Rendering it gives the smooth-lens counterpart of an image; its residual is the substructure's signal.
    """
    return {**params, "subhalo_profile": None, "subhalo_x": [], "subhalo_y": [], "subhalo_mass": [],
            "subhalo_sigma": [], "sie_einstein_radius": params["einstein_radius"]}


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
    if profile == "POINT_MASS":
        theta = einstein_radius(np.asarray(params["subhalo_mass"]))
        for x, y, t in zip(params["subhalo_x"], params["subhalo_y"], theta.tolist(), strict=True):
            lens_models.append("POINT_MASS")
            kwargs_lens.append({"theta_E": t, "center_x": x, "center_y": y})
    elif profile == "GAUSSIAN":
        # A Gaussian convergence of total lensing mass pi theta_E^2 deflects like a point mass far away.
        theta = einstein_radius(np.asarray(params["subhalo_mass"]))
        for x, y, t, s in zip(params["subhalo_x"], params["subhalo_y"], theta.tolist(), params["subhalo_sigma"], strict=True):
            lens_models.append("GAUSSIAN")
            kwargs_lens.append({"amp": math.pi * t * t, "sigma": s, "center_x": x, "center_y": y})
    kwargs_source = [{
        "amp": params["source_flux"] / _sersic_unit_flux(params["source_radius"], params["source_index"]),
        "R_sersic": params["source_radius"], "n_sersic": params["source_index"],
        "e1": params["source_e1"], "e2": params["source_e2"],
        "center_x": params["source_x"], "center_y": params["source_y"],
    }]
    return lens_models, kwargs_lens, ["SERSIC_ELLIPSE"], kwargs_source


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


def image_model(instrument: Instrument, lens_models: list[str], source_models: list[str]):
    """A lenstronomy ImageModel for this grid and these profiles, built once per process and reused."""
    key = (instrument, tuple(lens_models), tuple(source_models))
    model = _MODEL_CACHE.get(key)
    if model is not None:
        _MODEL_CACHE.move_to_end(key)
        return model
    model = build_image_model(instrument, lens_models, source_models)
    _MODEL_CACHE[key] = model
    if len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
        _MODEL_CACHE.popitem(last=False)
    return model


def build_image_model(instrument: Instrument, lens_models: list[str], source_models: list[str]):
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import util

    n, scale = instrument.size, instrument.pixel_scale
    _, _, ra0, dec0, _, _, pix2angle, _ = util.make_grid_with_coordtransform(
        num_pix=n, delta_pix=scale, center_ra=0, center_dec=0, subgrid_res=1, inverse=False)
    data = ImageData(image_data=np.zeros((n, n)), ra_at_xy_0=ra0, dec_at_xy_0=dec0, transform_pix2angle=pix2angle)
    psf = PSF(psf_type="GAUSSIAN", fwhm=instrument.psf_fwhm, truncation=3)
    return ImageModel(data, psf, lens_model_class=LensModel(lens_models),
                      source_model_class=LightModel(source_models),
                      kwargs_numerics={"supersampling_factor": 1, "supersampling_convolution": False})


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
    model = image_model(config.instrument, lens_models, source_models)
    return model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source)


def render(config: SimConfig, params: dict) -> np.ndarray:
    """The observed image (1, H, W) float32: lensed source convolved with the PSF, plus noise.

    The noise is Gaussian with the Poisson + sky + read-noise variance (the Gaussian limit of Poisson
    counts, as lenstronomy's own ``add_poisson``), drawn in float32 from its own stream.
    """
    clean = render_clean(config, params).astype(np.float32)
    seq = np.random.SeedSequence([config.seed, config.task_code, params["index"], STREAM_NOISE])
    rng = np.random.Generator(np.random.SFC64(seq))
    noise = rng.standard_normal(clean.shape, dtype=np.float32)
    noise *= noise_sigma(clean, config.instrument, params["exposure"])
    noise += clean
    return noise[None]


@dataclass(frozen=True)
class Simulator:
    """The picklable sample function handed to the packer: index -> (image, labels)."""

    config: SimConfig

    def __call__(self, index: int) -> tuple[np.ndarray, dict]:
        params = draw_params(self.config, index)
        return render(self.config, params), params

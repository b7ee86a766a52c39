"""The lens galaxy's light, tied to its halo as in real lenses (``--lens-light shmr``).

Without lens light a halo's mass reaches the image only through its Einstein radius, so the best possible
mass estimate is a function of the ring size. Real lenses also show the galaxy at the centre of the halo:
its brightness and size follow the halo mass with a scatter, and add information. Per sample:

1. **Stellar mass** from the Moster, Naab & White (2013) stellar-to-halo-mass relation at the lens
   redshift (their eq. 2 with the redshift-dependent best fit of their Table 1), with a log-normal scatter
   of 0.15 dex (their value).
2. **Effective radius** from the Shen et al. (2003) mass-size relation of early-type galaxies,
   R_e = 2.88e-6 kpc (M*/M_sun)^0.56, with their log-normal scatter sigma_lnR = 0.34 (0.148 dex),
   turned into arcsec at the lens's angular-diameter distance.
3. **Shape**: an elliptical Sersic profile of index n in [3.5, 4.5], centred on the lens, with the
   axis ratio of the mass (plus a 0.05 Gaussian scatter) and its position angle (plus 10 degrees).
4. **Apparent magnitude**: luminosity M*/Upsilon with a stellar mass-to-light ratio Upsilon = 3 M_sun/L_sun
   and an absolute solar magnitude of 4.65 (SDSS r, AB), moved to the lens redshift with its luminosity
   distance. The k-correction and the band's colour are ignored; the same magnitude is used for every
   instrument.

The "halo mass" of the simulator is the mass that sets the Einstein radius (DeepLenseSim's convention),
and it is used as the halo mass of the relation.
"""

from __future__ import annotations

import math

import numpy as np

SHMR_SCATTER_DEX = 0.15  # Moster+2013
SIZE_SLOPE, SIZE_NORM_KPC = 0.56, 2.88e-6  # Shen+2003, early types: R_e = b M^a (kpc)
SIZE_SCATTER_DEX = 0.34 / math.log(10)  # sigma_lnR = 0.34
SERSIC_INDEX = (3.5, 4.5)
AXIS_RATIO_SCATTER = 0.05
ANGLE_SCATTER = math.radians(10.0)
MASS_TO_LIGHT = 3.0  # M_sun / L_sun
SUN_ABSOLUTE_MAG = 4.65  # AB, SDSS r


def moster_stellar_fraction(log_halo_mass: float, z: float) -> float:
    """M*/M_halo of Moster, Naab & White (2013), eq. 2, with the z-dependent fit of their Table 1."""
    a = z / (1.0 + z)
    log_m1 = 11.590 + 1.195 * a
    norm = 0.0351 - 0.0247 * a
    beta = 1.376 - 0.826 * a
    gamma = 0.608 + 0.329 * a
    ratio = 10.0 ** (log_halo_mass - log_m1)
    return 2.0 * norm / (ratio**-beta + ratio**gamma)


def draw_lens_light(lens: dict, rng: np.random.Generator, *, luminosity_distance_mpc: float,
                    arcsec_per_kpc: float, zero_point: float) -> dict:
    """The lens light's parameters for ``lens`` (from :func:`physics._main_lens`); all labels included."""
    normal = rng.standard_normal(4)
    u = rng.random()
    log_mstar = (
        lens["halo_mass"]
        + math.log10(moster_stellar_fraction(lens["halo_mass"], lens["z_lens"]))
        + SHMR_SCATTER_DEX * normal[0]
    )
    log_reff_kpc = math.log10(SIZE_NORM_KPC) + SIZE_SLOPE * log_mstar + SIZE_SCATTER_DEX * normal[1]
    reff = 10.0**log_reff_kpc * arcsec_per_kpc
    absolute = SUN_ABSOLUTE_MAG - 2.5 * (log_mstar - math.log10(MASS_TO_LIGHT))
    magnitude = absolute + 5.0 * math.log10(luminosity_distance_mpc * 1e5)  # distance modulus, D_L in 10 pc
    q = float(np.clip(lens["axis_ratio"] + AXIS_RATIO_SCATTER * normal[2], 0.3, 1.0))
    angle = lens["lens_angle"] + ANGLE_SCATTER * normal[3]
    e = (1 - q) / (1 + q)
    return {
        "stellar_mass": log_mstar,
        "lens_mag": magnitude,
        "lens_reff": reff,
        "lens_reff_kpc": 10.0**log_reff_kpc,
        "lens_light_index": SERSIC_INDEX[0] + (SERSIC_INDEX[1] - SERSIC_INDEX[0]) * u,
        "lens_light_axis_ratio": q,
        "lens_light_e1": e * math.cos(2 * angle),
        "lens_light_e2": e * math.sin(2 * angle),
        "lens_light_flux": 10 ** (-0.4 * (magnitude - zero_point)),  # e-/s
    }

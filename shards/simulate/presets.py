"""Instrument presets: pixel grid, point-spread function and noise budget.

Noise follows the usual CCD model. With the noise-free image ``I`` in e-/s per pixel, a sky level
``S`` in e-/s per pixel, an exposure of ``t`` seconds split into ``k`` reads with read noise ``r`` e-,
the variance of a pixel (in (e-/s)^2) is ``(I + S) / t + k r^2 / t^2``; the sky itself is subtracted,
as in reduced data. The exposure time of each image is drawn log-uniform in ``exposure``, so the
signal-to-noise ratio varies from image to image, identically for every class.

======== ====== ========= ========= ================ ================ ========== =================
preset   pixels arcsec/px PSF FWHM zero point (mag)  sky (mag/arcsec²) read noise exposure (s)
======== ====== ========= ========= ================ ================ ========== =================
model1   150    0.05      0.087"    25.94            22.0              4 e- x1    1000-3162
euclid   64     0.101     0.16"     25.72            22.3              4.2 e- x4  1132-4528
hst      64     0.08      0.15"     25.96            22.3              4 e- x1    2700-10800
======== ====== ========= ========= ================ ================ ========== =================

``model1`` is DeepLense Model I (150x150, 0.05"/px, Gaussian PSF of 0.087" FWHM; exposure
10^U(3, 3.5) s, as in DeepLenseSim) with an HST ACS/F814W-like zero point and sky. ``euclid`` is
Euclid VIS (the pixel scale, seeing, zero point, sky and read noise of lenstronomy's Euclid VIS
configuration; four 566 s exposures nominal) like DeepLense Model II. ``hst`` is HST WFC3/F160W on a
0.08" drizzled grid with the undrizzled 0.15" PSF, like DeepLense Model III.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Instrument:
    name: str
    size: int  # pixels per side
    pixel_scale: float  # arcsec per pixel
    psf_fwhm: float  # arcsec, Gaussian PSF
    zero_point: float  # AB magnitude of a source giving 1 e-/s
    sky_brightness: float  # mag per arcsec^2
    read_noise: float  # e- per read
    num_reads: int
    exposure: tuple[float, float]  # seconds, drawn log-uniform
    description: str = ""

    @property
    def sky_per_pixel(self) -> float:
        """Sky level in e-/s per pixel."""
        return 10 ** (-0.4 * (self.sky_brightness - self.zero_point)) * self.pixel_scale**2

    @property
    def field_of_view(self) -> float:
        return self.size * self.pixel_scale

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["exposure"] = list(self.exposure)
        return out


INSTRUMENTS: dict[str, Instrument] = {
    "model1": Instrument(
        name="model1",
        size=150,
        pixel_scale=0.05,
        psf_fwhm=0.087,
        zero_point=25.94,
        sky_brightness=22.0,
        read_noise=4.0,
        num_reads=1,
        exposure=(1000.0, 3162.3),
        description='DeepLense Model I: 150x150 at 0.05"/px, Gaussian PSF (HST/ACS-like)',
    ),
    "euclid": Instrument(
        name="euclid",
        size=64,
        pixel_scale=0.101,
        psf_fwhm=0.16,
        zero_point=25.72,
        sky_brightness=22.3,
        read_noise=4.2,
        num_reads=4,
        exposure=(1132.0, 4528.0),
        description='Euclid VIS-like (DeepLense Model II): 64x64 at 0.101"/px, 0.16" PSF',
    ),
    "hst": Instrument(
        name="hst",
        size=64,
        pixel_scale=0.08,
        psf_fwhm=0.15,
        zero_point=25.96,
        sky_brightness=22.3,
        read_noise=4.0,
        num_reads=1,
        exposure=(2700.0, 10800.0),
        description='HST WFC3/F160W-like (DeepLense Model III): 64x64 at 0.08"/px, 0.15" PSF',
    ),
}


class UnknownInstrumentError(ValueError):
    pass


def get_instrument(name: str, *, size: int | None = None, pixel_scale: float | None = None) -> Instrument:
    """The preset ``name``, with its grid size and pixel scale optionally overridden."""
    if name not in INSTRUMENTS:
        raise UnknownInstrumentError(f"unknown instrument {name!r}; valid choices: {', '.join(INSTRUMENTS)}")
    inst = INSTRUMENTS[name]
    if size is not None:
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {size}")
        inst = dataclasses.replace(inst, size=int(size))
    if pixel_scale is not None:
        if not pixel_scale > 0:
            raise ValueError(f"pixel scale must be positive, got {pixel_scale}")
        inst = dataclasses.replace(inst, pixel_scale=float(pixel_scale))
    return inst

"""A progress bar with rate and ETA that stays quiet when output is not a terminal."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm.auto import tqdm


@contextmanager
def progress(total: int, desc: str, unit: str = "sample"):
    disable = os.environ.get("LENSTRAIN_NO_PROGRESS") == "1" or not sys.stderr.isatty()
    with tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1) as bar:
        yield bar

"""FORS2: raw pre-imaging frames only, two single-HDU chip files per exposure.

No FORS pipeline is packaged (the profile has ``pipe_support = false``), so
there is no calibration set: the raw frames are packaged with the reports.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from synth.common import DEFAULT_START, archive_name, common_header, eso, noise, obs_info

FORS2_CHIPS = ("CCID20-14-5-3", "CCID20-14-5-6")
FORS2_SHAPE = (1034, 2048)  # 2x2 binned raw (ny, nx)


def make_science(out_dir: Path, *, n_frames: int = 2, start: datetime = DEFAULT_START,
                       seed: int = 3) -> list[Path]:
    """FORS2 pre-imaging frames: two chip files per exposure. No pipeline reads them."""
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    files = []
    for i in range(n_frames):
        obs = obs_info("FORS2", start, n_frames, i + 1, "science")
        for c, chip in enumerate(FORS2_CHIPS):
            t = start + timedelta(seconds=i * 100, milliseconds=11 * c)
            signal = np.full(FORS2_SHAPE, 210.0 + 400.0, dtype=np.float32)
            data = noise(rng, signal, 1.25, 3.2)
            hdu = fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16))
            h = hdu.header
            common_header(h, "FORS2", "ESO-VLT-U1", t, 60.0, obs, ("SCIENCE", "OBJECT", "IMAGE,PRE"),
                           (10.6848, -9.3032))
            eso(h, "DET CHIP1 ID", chip)
            eso(h, "DET CHIPS", 2)
            eso(h, "DET READ CLOCK", "200Kps/2ports/low_gain")
            eso(h, "DET READ SPEED", "normal")
            eso(h, "DET READ MODE", "normal")
            eso(h, "DET WIN1 BINX", 2)
            eso(h, "DET WIN1 BINY", 2)
            eso(h, "DET WIN1 NX", FORS2_SHAPE[1])
            eso(h, "DET WIN1 NY", FORS2_SHAPE[0])
            eso(h, "DET OUT1 PRSCX", 16)
            eso(h, "DET OUT1 OVSCX", 16)
            eso(h, "INS FILT1 NAME", "R_SPECIAL")
            eso(h, "INS FILT1 ID", "R+76")
            eso(h, "INS COLL NAME", "COLL_SR")
            eso(h, "INS MODE", "IMG")
            eso(h, "OCS CON QUAD", 1)
            path = out_dir / archive_name("FORS2", t)
            hdu.writeto(path, overwrite=True)
            files.append(path)
    return files

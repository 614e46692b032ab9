"""Running the calibration recipes for a synthetic set, and stamping what they make.

The masters of a synthetic calibration set are made by the real calibration
recipes through :func:`services.processor.esorex.run_recipe`, so synth sits
above the services (like ``bench``): synth -> services -> shared. Only synth
runs these recipes (the services process SCIENCE ABs), so what each must
write (:data:`CALIBRATION_CHECKS`) lives here, not in the instrument profiles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.processor.esorex import run_recipe
from shared.profiles import RecipeCheck
from synth.common import Setup, SynthError, eso

#: What the calibration recipes must write. Only synth runs them (the services process SCIENCE
#: ABs), so their checks live here rather than in the instrument profiles.
CALIBRATION_CHECKS: dict[str, RecipeCheck] = {
    "hawki_dark_combine": RecipeCheck(expected_products=frozenset({"MASTER_DARK"})),
    "hawki_twilight_flat_combine": RecipeCheck(
        expected_products=frozenset({"MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_BPM"})),
    "vimos_ima_bias": RecipeCheck(expected_products=frozenset({"MASTER_BIAS"})),
    "vimos_ima_dark": RecipeCheck(expected_products=frozenset({"MASTER_DARK"})),
    "vimos_ima_twilight_flat": RecipeCheck(
        expected_products=frozenset({"MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_BPM"})),
}


def run_calibration(recipe: str, sof: list[tuple[Path, str]], workdir: Path,
                    recipe_dir: Path | None) -> dict[str, Path]:
    """Run one calibration recipe; its products by PRO.CATG, or SynthError naming the log."""
    result = run_recipe(recipe, sof, workdir, recipe_dir=recipe_dir, timeout_s=600,
                        check=CALIBRATION_CHECKS[recipe])
    if not result.ok:
        raise SynthError(f"building synthetic calibrations: {result.reason} (log: {result.log_path})")
    return {p.pro_catg: p.path for p in result.products}


def stamp(path: Path, keys: dict[str, Any]) -> None:
    """Set the keywords the OCA association compares (``inputFile.X == X``) on a master."""
    from astropy.io import fits

    with fits.open(path, mode="update") as hdul:
        for key, value in keys.items():
            if key in ("INSTRUME",):
                hdul[0].header[key] = value
            else:
                eso(hdul[0].header, key, value)


def setup_label(setup: Setup) -> str:
    """The setup's part of a master's file name and manifest key (``J``, ``R``)."""
    return "_".join(x for x in (setup.filter1, setup.filter2) if x and x != "OPEN") or "OPEN"

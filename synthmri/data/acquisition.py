"""Acquisition covariates: values that come from a BIDS JSON sidecar or from the image header, not from
``participants.tsv``.

A covariate declares its ``source`` in ``params.yaml`` (:class:`synthmri.config.Covariate`):

* ``participants`` (default): a column of ``participants.tsv`` (or of ``ingest.table``);
* ``sidecar``: a key of the image's BIDS sidecar metadata (``MagneticFieldStrength``, ``EchoTime``...),
  resolved with the BIDS inheritance principle by pybids (``BIDSLayout.get_metadata``: every
  ``*.json`` at the data-set root, subject or session level whose entities are a subset of the image's
  and whose suffix matches applies to it, the nearest one wins); with ``ingest.source: table``, the
  sidecar beside the image (same name, ``.json``);
* ``header``: a geometric fact of the raw image, read before any resampling (:data:`HEADER_KEYS`).

BIDS writes times in seconds. A time that is implausible in seconds but plausible in milliseconds (a
``RepetitionTime`` of 2300) is a unit written by mistake: the volume is set aside with that reason rather than
trained on as a 38-minute TR (:func:`check_units`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synthmri.errors import InvalidInput, StageError
from synthmri.logs import get_logger

if TYPE_CHECKING:  # config validates header keys against this module: no import cycle at run time
    from synthmri.config import Covariate

log = get_logger(__name__)

#: Plausible ranges of BIDS metadata in their BIDS units (BIDS specification, "Common principles: units";
#: MRI keys in "Modality specific files: MRI"). Times are seconds; a value above the range whose
#: thousandth lies in it is a time written in milliseconds.
PLAUSIBLE: dict[str, tuple[str, float, float]] = {
    "RepetitionTime": ("s", 1e-3, 30.0),
    "RepetitionTimeExcitation": ("s", 1e-3, 30.0),
    "RepetitionTimePreparation": ("s", 1e-3, 30.0),
    "EchoTime": ("s", 1e-5, 1.0),
    "InversionTime": ("s", 1e-3, 10.0),
    "MagneticFieldStrength": ("T", 0.01, 12.0),
    "FlipAngle": ("degrees", 0.1, 180.0),
}
_TIME_KEYS = frozenset(k for k, (unit, _, _) in PLAUSIBLE.items() if unit == "s")


def _largest_spacing(voxel_size: Sequence[float]) -> float:
    return float(max(voxel_size))


def _voxel_volume(voxel_size: Sequence[float]) -> float:
    return float(np.prod(voxel_size))


#: Header keys a ``source: header`` covariate may name, from the raw image's voxel spacing (mm).
#: ``voxel_size_mm`` is the largest spacing: the voxel size of an isotropic scan, the slice thickness of an
#: anisotropic one.
HEADER_KEYS = {"voxel_size_mm": _largest_spacing, "voxel_volume_mm3": _voxel_volume}


#: The header key whose value a sample can ask for: such a sample is written at that voxel size (sample stage).
VOXEL_SIZE_KEY = "voxel_size_mm"


def voxel_size_covariate(covariates: Sequence[Covariate]) -> str | None:
    """The name of the declared covariate that is the raw voxel size (``source: header``, key or name
    ``voxel_size_mm``), or None: a sample whose row gives it a value is written at that isotropic voxel size
    (:mod:`synthmri.data.spacing`), not in the training space."""
    for cov in covariates:
        if cov.source == "header" and (cov.key if isinstance(cov.key, str) else cov.name) == VOXEL_SIZE_KEY:
            return cov.name
    return None


def sidecar_keys(cov: Covariate) -> list[str]:
    """The metadata keys of a sidecar covariate, in order of preference (the first one present wins)."""
    key = cov.key if cov.key is not None else cov.name
    return [key] if isinstance(key, str) else list(key)


def check_units(key: str, value: Any) -> None:
    """``InvalidInput`` naming the key, the value and the likely mistake when a known BIDS key is outside its
    plausible range (times: seconds)."""
    if key not in PLAUSIBLE or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    unit, low, high = PLAUSIBLE[key]
    number = float(value)
    if not math.isfinite(number) or low <= number <= high:
        return
    if key in _TIME_KEYS and low <= number / 1000.0 <= high:
        raise InvalidInput(
            f"{key} = {number:g} is not plausible in seconds (BIDS times are seconds): it looks like "
            f"milliseconds written by mistake ({number / 1000:g} s)"
        )
    raise InvalidInput(f"{key} = {number:g} is outside the plausible range [{low:g}, {high:g}] {unit}")


def sidecar_value(cov: Covariate, metadata: Mapping[str, Any]) -> str:
    """The covariate's value in ``metadata`` as text (the way ``participants.tsv`` gives values, so one parser
    checks both), ``""`` when no key is present; units checked (:func:`check_units`)."""
    for key in sidecar_keys(cov):
        if key in metadata and metadata[key] is not None:
            value = metadata[key]
            if isinstance(value, (list, dict)):
                raise InvalidInput(f"sidecar key {key} holds a {type(value).__name__}, not a single value")
            check_units(key, value)
            return str(value)
    return ""


def header_value(cov: Covariate, voxel_size: Sequence[float]) -> str:
    """The covariate's value from the raw image's voxel spacing, as text."""
    key = cov.key if isinstance(cov.key, str) else cov.name
    return f"{HEADER_KEYS[key](voxel_size):.6g}"


def _entities(name: str) -> tuple[set[str], str]:
    """BIDS entities (``key-value`` parts) and suffix of a file name: ``sub-01_ses-1_T1w.json`` ->
    ``({"sub-01", "ses-1"}, "T1w")``."""
    parts = name.split(".")[0].split("_")
    return {p for p in parts[:-1] if "-" in p}, parts[-1]


class SidecarReader:
    """Sidecar metadata of the images under a BIDS root (pybids, built once per ingest run), or of the JSON
    file beside each image when the data set is not BIDS (``ingest.source: table``).

    A sidecar that is not valid JSON would stop pybids' indexing of the whole data set; it is left out of the
    index instead, and every image it applies to (same folder or below, same suffix, its entities a subset
    of the image's) is set aside with its name, since that image's metadata is unknown."""

    def __init__(self, root: Path, bids: bool) -> None:
        self.root = Path(root).resolve()
        self.layout = None
        self.unreadable: dict[Path, str] = {}
        if bids:
            try:
                from bids import BIDSLayout, BIDSLayoutIndexer
                from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE
            except ImportError:  # pybids is a dependency; a broken install must say so, not skip sidecars
                raise StageError("sidecar covariates need pybids (pip install pybids)") from None
            for path in sorted(self.root.rglob("*.json")):
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, ValueError) as exc:
                    self.unreadable[path] = f"{type(exc).__name__}: {exc}"
            ignore = [*DEFAULT_LOCATIONS_TO_IGNORE, *(p.relative_to(self.root).as_posix() for p in self.unreadable)]
            # validate=False: the BIDS validator rejects files a research data set often carries (derivatives,
            # extra columns); ingest checks what SynthMRI needs itself and quarantines per file.
            indexer = BIDSLayoutIndexer(validate=False, ignore=ignore)
            self.layout = BIDSLayout(str(self.root), derivatives=False, indexer=indexer)

    def metadata(self, image: str | Path) -> dict[str, Any]:
        """Every sidecar key that applies to ``image`` (inheritance resolved; nearest file wins)."""
        if self.layout is not None:
            self._check_readable(Path(image))
            return dict(self.layout.get_metadata(str(image)))
        name = Path(image).name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        beside = Path(image).with_name(stem + ".json")
        if not beside.is_file():
            return {}
        try:
            return dict(json.loads(beside.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidInput(f"sidecar {beside.name} is not readable JSON ({exc})") from None

    def _check_readable(self, image: Path) -> None:
        image = image.resolve()
        entities, suffix = _entities(image.name)
        for path, reason in self.unreadable.items():
            sidecar_entities, sidecar_suffix = _entities(path.name)
            if image.is_relative_to(path.parent) and sidecar_suffix == suffix and sidecar_entities <= entities:
                rel = path.relative_to(self.root).as_posix()
                raise InvalidInput(f"sidecar {rel}, which applies to this image, is not readable JSON ({reason})")

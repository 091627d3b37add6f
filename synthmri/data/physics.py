"""MR signal equations and acquisition protocols for the simulated demo cohort.

The demo's tissue intensities come from the sequence's signal equation applied to tissue relaxation times and
proton densities at the protocol's field strength, so that its "sites" are physics (field strength, sequence
timing) plus vendor-like gain, blur, bias and noise, and a model conditioned on acquisition parameters has a real
effect to learn (GM/WM contrast rises with the inversion time of an MPRAGE, for example).

Tissue parameters (approximate literature values; the demo needs plausible contrast, not a quantitative phantom):

* T1 at 3 T: white matter 0.832 s, grey matter 1.331 s (Wansapura et al., "NMR relaxation times in the human brain
  at 3.0 tesla", J Magn Reson Imaging 9:531–538, 1999); at 1.5 T: white matter ≈ 0.65 s, grey matter ≈ 1.10 s, the
  range of the 1.5 T literature (e.g. Lu et al., "Routine clinical brain MRI sequences for use at 3.0 Tesla",
  J Magn Reson Imaging 22:13–22, 2005, which also gives CSF ≈ 4.1–4.3 s at both fields).
* T2*: white matter ≈ 53 / 72 ms, grey matter ≈ 66 / 84 ms at 3 / 1.5 T (Peters et al., "T2* measurements in human
  brain at 1.5, 3 and 7 T", Magn Reson Imaging 25:748–753, 2007); CSF long (taken as 0.4 s). At T1w echo times
  (2–5 ms) T2* changes contrasts by a few per cent.
* Proton density relative to CSF: white matter 0.69, grey matter 0.80, CSF 1.0 (the BrainWeb phantom's values,
  Kwan et al., IEEE Trans Med Imaging 18:1085–1097, 1999).

Signal equations (magnitude images):

* SPGR / FLASH, spoiled steady state: ``S = PD · sin α (1 − E1) / (1 − cos α · E1) · exp(−TE / T2*)``,
  ``E1 = exp(−TR / T1)``.
* MPRAGE, inversion-recovery approximation: ``S = PD · |1 − 2 exp(−TI / T1) + exp(−TR / T1)| · exp(−TE / T2*)``
  with TR the preparation repetition time; the readout train's small flip angles are neglected (Deichmann et al.,
  NeuroImage 12:112–127, 2000, give the full model). Good enough for the direction and rough size of the contrast
  changes with TI, TR and field strength.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

#: Tissue parameters per field strength (tesla): T1 (s), T2* (s), proton density (relative to CSF).
TISSUES: dict[float, dict[str, dict[str, float]]] = {
    1.5: {
        "csf": {"t1": 4.2, "t2s": 0.4, "pd": 1.0},
        "gm": {"t1": 1.10, "t2s": 0.084, "pd": 0.80},
        "wm": {"t1": 0.65, "t2s": 0.072, "pd": 0.69},
    },
    3.0: {
        "csf": {"t1": 4.2, "t2s": 0.4, "pd": 1.0},
        "gm": {"t1": 1.331, "t2s": 0.066, "pd": 0.80},
        "wm": {"t1": 0.832, "t2s": 0.053, "pd": 0.69},
    },
}


def spgr_signal(pd: float, t1: float, t2s: float, tr: float, te: float, flip_deg: float) -> float:
    """Spoiled gradient-echo steady-state signal (times in seconds, flip angle in degrees)."""
    e1 = math.exp(-tr / t1)
    alpha = math.radians(flip_deg)
    return pd * math.sin(alpha) * (1.0 - e1) / (1.0 - math.cos(alpha) * e1) * math.exp(-te / t2s)


def mprage_signal(pd: float, t1: float, t2s: float, tr: float, te: float, ti: float) -> float:
    """Magnitude inversion-recovery signal of an MPRAGE (TR: preparation repetition time; seconds)."""
    return pd * abs(1.0 - 2.0 * math.exp(-ti / t1) + math.exp(-tr / t1)) * math.exp(-te / t2s)


@dataclass(frozen=True)
class Protocol:
    """One acquisition: what a BIDS sidecar of the image says (seconds, tesla, degrees)."""

    name: str
    sequence: Literal["MPRAGE", "SPGR"]
    field_t: float
    tr_s: float
    te_s: float
    flip_deg: float
    ti_s: float | None = None

    def signal(self, tissue: str) -> float:
        p = TISSUES[self.field_t][tissue]
        if self.sequence == "MPRAGE":
            if self.ti_s is None:
                raise ValueError(f"protocol {self.name}: an MPRAGE needs an inversion time")
            return mprage_signal(p["pd"], p["t1"], p["t2s"], self.tr_s, self.te_s, self.ti_s)
        return spgr_signal(p["pd"], p["t1"], p["t2s"], self.tr_s, self.te_s, self.flip_deg)

    def contrast(self) -> tuple[float, float]:
        """``(CSF, GM)`` intensities relative to white matter = 1."""
        wm = self.signal("wm")
        return self.signal("csf") / wm, self.signal("gm") / wm

    def sidecar(self, manufacturer: str) -> dict[str, object]:
        """The BIDS sidecar keys of an image acquired with this protocol."""
        keys: dict[str, object] = {
            "MagneticFieldStrength": self.field_t,
            "Manufacturer": manufacturer,
            "PulseSequenceType": self.sequence,
            "EchoTime": self.te_s,
            "FlipAngle": self.flip_deg,
            "RepetitionTime": self.tr_s,
            "ProtocolName": self.name,
        }
        if self.sequence == "MPRAGE":
            keys["RepetitionTimePreparation"] = self.tr_s
            keys["InversionTime"] = self.ti_s
        else:
            keys["RepetitionTimeExcitation"] = self.tr_s
        return keys


@dataclass(frozen=True)
class Scanner:
    """A simulated site's scanner: field strength, vendor and the protocols run on it."""

    manufacturer: str
    protocols: tuple[Protocol, ...]


#: The demo's scanners: two 3 T and one 1.5 T, each running MPRAGEs with different timings. Sites map to
#: them in order (``site1`` -> the first); other site names by a hash of the name (:func:`scanner_of`).
SCANNERS: tuple[Scanner, ...] = (
    Scanner(
        "SimVendorA",
        (
            Protocol("mprage-3t-ti900", "MPRAGE", 3.0, tr_s=2.3, te_s=0.00298, flip_deg=9.0, ti_s=0.9),
            Protocol("mprage-3t-ti1100", "MPRAGE", 3.0, tr_s=2.5, te_s=0.00298, flip_deg=8.0, ti_s=1.1),
        ),
    ),
    Scanner(
        "SimVendorB",
        (
            Protocol("mprage-1.5t-ti800", "MPRAGE", 1.5, tr_s=2.0, te_s=0.0036, flip_deg=8.0, ti_s=0.8),
            Protocol("mprage-1.5t-ti1000", "MPRAGE", 1.5, tr_s=2.4, te_s=0.0036, flip_deg=8.0, ti_s=1.0),
        ),
    ),
    Scanner(
        "SimVendorC",
        (Protocol("mprage-3t-ti1000", "MPRAGE", 3.0, tr_s=2.4, te_s=0.0023, flip_deg=8.0, ti_s=1.0),),
    ),
)


def scanner_of(site: str, sites: list[str]) -> Scanner:
    """The scanner of a demo site: by position for ``site1``, ``site2``... of the default list, else by name."""
    if site in sites and sites.index(site) < len(SCANNERS) and site == f"site{sites.index(site) + 1}":
        return SCANNERS[sites.index(site)]
    return SCANNERS[zlib.crc32(site.encode("utf-8")) % len(SCANNERS)]

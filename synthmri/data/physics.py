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
* MPRAGE: the longitudinal magnetization simulated event by event over one preparation cycle, in its steady state
  (the model of Deichmann et al., NeuroImage 12:112–127, 2000, solved numerically): a perfect inversion, free
  recovery to the first readout pulse, a train of ``readout_pulses`` spoiled pulses of angle α every
  ``echo_spacing`` (linear ordering: the centre of k-space, which sets the contrast, at pulse n/2, at TI after the
  inversion), free recovery to the next inversion at TR. ``S = PD · |Mz(centre)| · sin α · exp(−TE / T2*)``. With
  a single 90° pulse this is the textbook inversion recovery ``|1 − 2 exp(−TI/T1) + exp(−TR/T1)|`` (tested);
  the readout train is what keeps CSF from being nulled (CSF/WM ≈ 0.12–0.19, GM/WM ≈ 0.64–0.70 for the demo's
  protocols, as on real MPRAGEs) — the textbook formula alone would null it.
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


def mprage_signal(
    pd: float,
    t1: float,
    t2s: float,
    tr: float,
    te: float,
    ti: float,
    flip_deg: float,
    readout_pulses: int = 176,
    echo_spacing: float = 0.007,
) -> float:
    """Steady-state MPRAGE signal at the centre of k-space (seconds, degrees; TR: between inversions).

    Each event maps Mz (in units of M0) affinely, ``Mz -> a·Mz + b``; composing one cycle gives its steady state
    ``b / (1 − a)`` exactly, without iterating cycles."""
    first_pulse = ti - (readout_pulses // 2) * echo_spacing
    after_train = tr - first_pulse - readout_pulses * echo_spacing
    if first_pulse < 0 or after_train < 0:
        raise ValueError(
            f"MPRAGE timing: TI={ti} s, TR={tr} s cannot hold {readout_pulses} pulses every {echo_spacing} s"
        )
    cos_a = math.cos(math.radians(flip_deg))

    def recover(a: float, b: float, seconds: float) -> tuple[float, float]:
        e = math.exp(-seconds / t1)
        return a * e, b * e + 1.0 - e

    a, b = recover(-1.0, 0.0, first_pulse)  # inversion, then free recovery
    centre = (a, b)
    for pulse in range(readout_pulses):
        if pulse == readout_pulses // 2:
            centre = (a, b)
        a, b = recover(a * cos_a, b * cos_a, echo_spacing)
    a, b = recover(a, b, after_train)
    steady = b / (1.0 - a)  # Mz just before the inversion
    mz_centre = centre[0] * steady + centre[1]
    return pd * abs(mz_centre) * math.sin(math.radians(flip_deg)) * math.exp(-te / t2s)


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
    #: Voxel size as a multiple of the cohort's template resolution (isotropic): 1.2 is a 1.2 mm scan of a 1 mm
    #: template, 2.4 mm in the 2 mm demo. It goes in the image header, not the sidecar (BIDS: the header is the
    #: authority on geometry).
    voxel_scale: float = 1.0

    def signal(self, tissue: str) -> float:
        p = TISSUES[self.field_t][tissue]
        if self.sequence == "MPRAGE":
            if self.ti_s is None:
                raise ValueError(f"protocol {self.name}: an MPRAGE needs an inversion time")
            return mprage_signal(p["pd"], p["t1"], p["t2s"], self.tr_s, self.te_s, self.ti_s, self.flip_deg)
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


#: The demo's scanners: two 3 T and one 1.5 T, running MPRAGEs with different timings and T1-weighted SPGRs
#: (FLASH: lower GM/WM contrast than an MPRAGE, 0.76-0.79 against 0.65-0.71, and brighter CSF), at three voxel
#: sizes. SNR grows with field strength and with voxel volume, so a 1.5 T protocol uses larger voxels to keep
#: about the SNR of a 3 T one (1.2^3 = 1.7 of the volume for half the field): the demo's noise level
#: (``demo.noise_std``, relative to white matter) is the same for every protocol. Sites map to the scanners in
#: order (``site1`` -> the first); other site names by a hash of the name (:func:`scanner_of`).
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
            Protocol(
                "mprage-1.5t-ti800", "MPRAGE", 1.5, tr_s=2.0, te_s=0.0036, flip_deg=8.0, ti_s=0.8, voxel_scale=1.2
            ),
            Protocol(
                "mprage-1.5t-ti1000", "MPRAGE", 1.5, tr_s=2.4, te_s=0.0036, flip_deg=8.0, ti_s=1.0, voxel_scale=1.2
            ),
            Protocol("spgr-1.5t-fa30", "SPGR", 1.5, tr_s=0.022, te_s=0.005, flip_deg=30.0, voxel_scale=1.5),
        ),
    ),
    Scanner(
        "SimVendorC",
        (
            Protocol("mprage-3t-ti1000", "MPRAGE", 3.0, tr_s=2.4, te_s=0.0023, flip_deg=8.0, ti_s=1.0),
            Protocol("spgr-3t-fa25", "SPGR", 3.0, tr_s=0.020, te_s=0.004, flip_deg=25.0, voxel_scale=1.2),
        ),
    ),
)


def scanner_of(site: str, sites: list[str]) -> Scanner:
    """The scanner of a demo site: by position for ``site1``, ``site2``... of the default list, else by name."""
    if site in sites and sites.index(site) < len(SCANNERS) and site == f"site{sites.index(site) + 1}":
        return SCANNERS[sites.index(site)]
    return SCANNERS[zlib.crc32(site.encode("utf-8")) % len(SCANNERS)]

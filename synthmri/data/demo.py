"""The built-in demo cohort: simulated T1-weighted brain MRI with known covariate effects.

Every subject starts from the same tissue label map, built once from nilearn's MNI152 template
and its grey/white matter probability maps (background, external/sulcal CSF, grey matter, white
matter, lateral ventricles). Each subject then gets, deterministically from
``(params.demo.seed, subject index)``:

* covariates: age (uniform in ``demo.age_range``), sex (levels of the ``sex`` covariate), site;
* age-driven atrophy: the ventricles grow into the surrounding tissue by a distance that rises from
  0 mm at 20 years to about 6 mm at 90 years, and cortical grey matter next to external CSF turns
  into CSF (thinner cortex, wider sulci), both modulated by a smooth random field so that the
  atrophy pattern differs between subjects;
* sex-driven head size: a global scale of about 0.98 (F) or 1.02 (M) (ICV ratio 1.13), plus a small random affine
  and a smooth random elastic deformation of amplitude ``demo.deformation_mm`` (torchio);
* an acquisition: each site is a simulated scanner (field strength, vendor; :data:`synthmri.data.physics.SCANNERS`)
  and each subject is scanned with one of its protocols (MPRAGEs with different TI/TR), drawn from a random
  stream of its own so that the anatomy does not depend on it; the image's BIDS sidecar records it;
* a label-to-image contrast model in the spirit of SynthSeg: tissue intensities from the protocol's signal
  equation (:mod:`synthmri.data.physics`: literature T1/T2*/PD at that field), per-subject jitter, and the
  site's vendor-like gain, within-tissue noise, partial-volume blur, a smooth multiplicative bias field and
  Rician noise of std ``demo.noise_std`` x WM intensity.

The ground truth in ``participants.tsv`` (tissue volumes in ml) is measured on each subject's final,
deformed label map, so the report can check that a model conditioned on age reproduces the effect.
Subject ``i`` depends only on the seed and ``i``: changing ``n_subjects`` adds or drops subjects
without changing the others.
"""

from __future__ import annotations

import functools
import glob
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torchio as tio
from scipy import ndimage as ndi

from synthmri import __version__
from synthmri.data.covariates import BIDS_MISSING
from synthmri.data.mni import VENTRICLE_BOX_MM
from synthmri.data.physics import Protocol, scanner_of
from synthmri.io import atomic_path, save_nifti, write_text_atomic
from synthmri.logs import get_logger, progress
from synthmri.training.runtime import intra_op_threads
from synthmri.viz import three_plane_grid

if TYPE_CHECKING:
    from synthmri.config import Params

log = get_logger(__name__)

# tissue labels of the simulated anatomy
BACKGROUND, CSF, GM, WM, VENTRICLE = 0, 1, 2, 3, 4
LABEL_NAMES = {
    BACKGROUND: "background",
    CSF: "external CSF",
    GM: "grey matter",
    WM: "white matter",
    VENTRICLE: "lateral ventricles",
}

DESCRIP = "SynthMRI demo cohort (simulated)"
STAMP_KEY = "SynthMRIDemo"
# Bump when the simulation changes, so that ensure_demo_cohort regenerates existing cohorts.
GENERATOR_VERSION = 5  # 3: tissue contrast from the protocol's signal equation, BIDS sidecars; 4: steady-state MPRAGE;
# 5: SPGR protocols and per-protocol voxel sizes

# anatomy model (ages in years, distances in mm)
ATROPHY_START_AGE = 20.0
ATROPHY_SPAN_YEARS = 70.0  # ATROPHY_START_AGE + span = age of "full" atrophy (90 y)
VENTRICLE_GROWTH_MM = 6.0  # ventricle enlargement at 90 y
VENTRICLE_GROWTH_POWER = 1.3  # > 1: enlargement accelerates with age
VENTRICLE_GROWTH_NOISE_MM = 0.4
VENTRICLE_WALL_MM = 4.0  # ventricles never grow closer than this to external CSF
CORTEX_THINNING_MM = 1.6  # depth of cortex turned into CSF at 90 y (before modulation)
CORTEX_THINNING_NOISE_MM = 0.15
EXTERNAL_CSF_RIM_MM = 2.0  # subarachnoid CSF added around the skull-stripped template
ATROPHY_FIELD_SPACING_MM = 8.0  # grid of the smooth random field that modulates atrophy locally
ATROPHY_FIELD_SMOOTHING = 1.5  # its Gaussian smoothing, in grid cells (12 mm)
ATROPHY_FIELD_LOG_STD = 0.35  # local atrophy distance = age-driven distance x exp(0.35 x field)
# Linear head scale by sex: (1.02 / 0.98)^3 = 1.13, the male/female intracranial-volume ratio of real
# adult cohorts (about 1.12-1.15; e.g. Ruigrok et al. 2014, Neurosci Biobehav Rev 39:34). It was
# 1.05 / 0.95, i.e. 1.35 in volume, an effect no real cohort shows.
SEX_SCALE = {"f": 0.98, "female": 0.98, "m": 1.02, "male": 1.02}
HEAD_SCALE_NOISE = 0.02  # log-normal per-subject noise of the global scale
AXIS_SCALE_NOISE = 0.01
ROTATION_DEG = 2.0
TRANSLATION_MM = 2.0
ELASTIC_CONTROL_POINTS = 7
BIAS_FIELD_ORDER = 3
N_BIAS_COEFFICIENTS = (BIAS_FIELD_ORDER + 1) * (BIAS_FIELD_ORDER + 2) * (BIAS_FIELD_ORDER + 3) // 6
CONTRAST_JITTER = 0.03  # relative per-subject jitter of each tissue intensity
GAIN_JITTER = 0.05
PROTOCOL_STREAM = 17  # third seed word of the protocol draw's own random stream


# ----------------------------------------------------------------------------------------------
# the template anatomy, shared by every subject


@dataclass(frozen=True)
class BaseAnatomy:
    """Tissue labels on the MNI152 grid, plus the distance maps that the atrophy model thresholds."""

    labels: np.ndarray  # uint8 (x, y, z), RAS
    affine: np.ndarray
    spacing: tuple[float, float, float]
    dist_ventricle: np.ndarray  # float32 mm from the nearest ventricle voxel
    depth_external: np.ndarray  # float32 mm from the nearest external CSF/background boundary


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=2)
def base_anatomy(resolution_mm: int = 2) -> BaseAnatomy:
    """Build (once per resolution) the tissue label map from nilearn's MNI152 template (offline)."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    template = load_mni152_template(resolution=resolution_mm)
    grey = load_mni152_gm_template(resolution=resolution_mm)
    white = load_mni152_wm_template(resolution=resolution_mm)
    for image in (grey, white):
        if image.shape != template.shape or not np.allclose(image.affine, template.affine):
            raise RuntimeError("nilearn's MNI152 tissue maps are not on the template grid")
    t1 = np.asarray(template.get_fdata(dtype=np.float32))
    p_gm = np.clip(np.asarray(grey.get_fdata(dtype=np.float32)), 0, 1)
    p_wm = np.clip(np.asarray(white.get_fdata(dtype=np.float32)), 0, 1)
    affine = np.asarray(template.affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))

    # The template is skull-stripped: the head is everything brighter than the background.
    head = t1 > 0.05 * float(t1.max())
    components, n = ndi.label(head)
    if n > 1:
        sizes = ndi.sum(head, components, range(1, n + 1))
        head = components == (int(np.argmax(sizes)) + 1)
    head = ndi.binary_fill_holes(head)

    p_csf = np.clip(1.0 - p_gm - p_wm, 0, 1)
    labels = (np.stack([p_csf, p_gm, p_wm]).argmax(axis=0) + CSF).astype(np.uint8)
    labels[~head] = BACKGROUND
    labels[_find_ventricles(labels == CSF, head, affine, spacing)] = VENTRICLE

    # A thin layer of subarachnoid CSF around the brain (the template has none left).
    outside = ndi.distance_transform_edt(~head, sampling=spacing)
    labels[(outside > 0) & (outside <= EXTERNAL_CSF_RIM_MM + 1e-6)] = CSF

    dist_ventricle = ndi.distance_transform_edt(labels != VENTRICLE, sampling=spacing).astype(np.float32)
    external = (labels == CSF) | (labels == BACKGROUND)
    # distance to the boundary of the external CSF, not to the centre of its nearest voxel
    depth = ndi.distance_transform_edt(~external, sampling=spacing) - 0.5 * min(spacing)
    depth = np.maximum(depth, 0).astype(np.float32)
    return BaseAnatomy(_readonly(labels), _readonly(affine), spacing, _readonly(dist_ventricle), _readonly(depth))


def _find_ventricles(
    csf: np.ndarray, head: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]
) -> np.ndarray:
    """The lateral ventricles: CSF components enclosed by tissue, of at least 1 ml, centred in the
    central box of the brain (external CSF components touch the outside of the brain instead)."""
    components, n = ndi.label(csf)
    touches_outside = np.zeros(n + 1, dtype=bool)
    touches_outside[np.unique(components[ndi.binary_dilation(~head)])] = True
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = ndi.sum(csf, components, range(1, n + 1)) * voxel_ml
    centres = ndi.center_of_mass(csf, components, range(1, n + 1))
    box = VENTRICLE_BOX_MM
    keep = np.zeros(n + 1, dtype=bool)
    for index, (size, centre) in enumerate(zip(sizes, centres), start=1):
        x, y, z = affine[:3, :3] @ np.asarray(centre) + affine[:3, 3]
        central = box[0][0] <= x <= box[0][1] and box[1][0] <= y <= box[1][1] and box[2][0] <= z <= box[2][1]
        keep[index] = central and size >= 1.0 and not touches_outside[index]
    if not keep.any():
        raise RuntimeError("could not find the lateral ventricles in nilearn's MNI152 template")
    return keep[components]


# ----------------------------------------------------------------------------------------------
# sites: the contrast model


@dataclass(frozen=True)
class SiteContrast:
    """Vendor-like characteristics of a simulated site's scanner (the tissue contrast comes from the protocol)."""

    gain: float  # scanner units of white matter
    blur_mm: float  # partial-volume blur (Gaussian std)
    bias_strength: float  # range of the bias-field polynomial coefficients
    tissue_noise: float  # within-tissue intensity variation (std, relative to WM)


@functools.cache
def site_contrast(site: str) -> SiteContrast:
    """Fixed by the site's name (not by the seed), so 'site1' looks the same in every cohort."""
    rng = np.random.default_rng(zlib.crc32(site.encode("utf-8")))
    rng.uniform(size=2)  # the draws that were the site's CSF and GM levels before the signal equations
    return SiteContrast(
        gain=float(rng.uniform(500.0, 1500.0)),
        blur_mm=float(rng.uniform(0.5, 1.0)),
        bias_strength=float(rng.uniform(0.08, 0.2)),
        tissue_noise=float(rng.uniform(0.02, 0.04)),
    )


# ----------------------------------------------------------------------------------------------
# one subject


@dataclass(frozen=True)
class DemoSubject:
    participant_id: str
    age: float
    sex: str
    site: str
    protocol: Protocol
    manufacturer: str
    labels: np.ndarray  # final (deformed) tissue labels, on the template grid
    image: np.ndarray  # float32 T1w, on the protocol's voxel grid
    affine: np.ndarray  # of the labels (the template grid)
    image_affine: np.ndarray  # of the image: the template's, scaled to the protocol's voxel size

    def volumes_ml(self) -> dict[str, float]:
        return tissue_volumes_ml(self.labels, self.affine)

    def labels_on_image_grid(self) -> np.ndarray:
        """The ground-truth labels resampled (nearest neighbour) to the image's voxel grid, to measure the image
        tissue by tissue; the volumes in ml stay measured on the finer template grid."""
        if self.image.shape == self.labels.shape and np.allclose(self.image_affine, self.affine):
            return self.labels
        labels = tio.LabelMap(tensor=torch.from_numpy(self.labels[None].astype(np.int16)), affine=self.affine)
        reference = tio.ScalarImage(tensor=torch.zeros((1, *self.image.shape)), affine=self.image_affine)
        return tio.Resample(reference, copy=False)(labels).data[0].numpy().astype(np.uint8)

    def row(self) -> dict[str, object]:
        return {
            "participant_id": self.participant_id,
            "age": self.age,
            "sex": self.sex,
            "site": self.site,
            **{key: round(value, 3) for key, value in self.volumes_ml().items()},
        }

    def sidecar(self) -> dict[str, object]:
        """The image's BIDS sidecar: the acquisition it was simulated with."""
        return self.protocol.sidecar(self.manufacturer)


def tissue_volumes_ml(labels: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=5)
    gm, wm = counts[GM] * voxel_ml, counts[WM] * voxel_ml
    return {
        "ventricle_ml": counts[VENTRICLE] * voxel_ml,
        "csf_ml": (counts[CSF] + counts[VENTRICLE]) * voxel_ml,
        "gm_ml": gm,
        "wm_ml": wm,
        "brain_ml": gm + wm,
        "icv_ml": (counts.sum() - counts[BACKGROUND]) * voxel_ml,
    }


def participant_id(index: int) -> str:
    return f"sub-{index + 1:03d}"


def _sex_levels(params: Params) -> list[str]:
    for covariate in params.covariates:
        if covariate.name == "sex" and covariate.levels:
            return list(covariate.levels)
    return ["F", "M"]


def _subject_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, index])


def _atrophy_amount(age: float) -> float:
    """0 at ATROPHY_START_AGE, 1 at ATROPHY_START_AGE + ATROPHY_SPAN_YEARS (may exceed 1 beyond)."""
    return max(age - ATROPHY_START_AGE, 0.0) / ATROPHY_SPAN_YEARS


def _field_grid(base: BaseAnatomy) -> tuple[int, int, int]:
    extent = np.asarray(base.labels.shape) * np.asarray(base.spacing)
    return tuple(int(n) for n in np.ceil(extent / ATROPHY_FIELD_SPACING_MM).astype(int) + 1)


def _smooth_field(white_noise: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth, stationary, zero-mean unit-variance random field on the full grid, from coarse noise."""
    coarse = ndi.gaussian_filter(white_noise, ATROPHY_FIELD_SMOOTHING, mode="reflect")
    coarse = (coarse - coarse.mean()) / max(float(coarse.std()), 1e-6)
    tensor = torch.from_numpy(coarse.astype(np.float32))[None, None]
    field = torch.nn.functional.interpolate(tensor, size=shape, mode="trilinear", align_corners=True)
    return field[0, 0].numpy()


def _bias_field(coefficients: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """torchio's polynomial bias field, evaluated on a 4x coarser grid and upsampled (it is smooth)."""
    coarse_shape = tuple(max(4, n // 4) for n in shape)
    coarse = tio.BiasField.generate_bias_field(
        np.zeros((1, *coarse_shape), np.float32), BIAS_FIELD_ORDER, [float(c) for c in coefficients]
    )
    log_field = torch.from_numpy(np.log(coarse))[None, None]
    log_field = torch.nn.functional.interpolate(log_field, size=shape, mode="trilinear", align_corners=False)
    return np.exp(log_field[0, 0].numpy())


def simulate_subject(params: Params, index: int) -> DemoSubject:
    """Simulate subject ``index`` (0-based); depends only on ``params.demo`` and the index. On one intra-op thread:
    the same bytes whichever process (a worker of :func:`_write_cohort`, a test) or machine simulates it."""
    with intra_op_threads(1):
        return _simulate_subject(params, index)


def _simulate_subject(params: Params, index: int) -> DemoSubject:
    demo = params.demo
    base = base_anatomy(demo.template_resolution_mm)
    shape = base.labels.shape
    rng = _subject_rng(demo.seed, index)

    # covariates
    age = round(float(rng.uniform(*demo.age_range)), 1)
    levels = _sex_levels(params)
    sex = levels[int(rng.integers(len(levels)))]
    site = demo.sites[int(rng.integers(len(demo.sites)))]

    # every subject-level parameter is drawn here, in a fixed order whatever the settings (so that
    # changing one setting does not reshuffle the others); voxel-wise noise is drawn last, below
    atrophy_noise = rng.standard_normal(_field_grid(base))
    ventricle_noise = rng.normal(0.0, VENTRICLE_GROWTH_NOISE_MM)
    cortex_noise = rng.normal(0.0, CORTEX_THINNING_NOISE_MM)
    head_scale = SEX_SCALE.get(sex.lower(), 1.0) * float(np.exp(rng.normal(0.0, HEAD_SCALE_NOISE)))
    axis_scales = head_scale * np.exp(rng.normal(0.0, AXIS_SCALE_NOISE, 3))
    degrees = rng.normal(0.0, ROTATION_DEG, 3)
    translation = rng.normal(0.0, TRANSLATION_MM, 3)
    control_points = rng.uniform(-1.0, 1.0, (ELASTIC_CONTROL_POINTS,) * 3 + (3,)) * demo.deformation_mm
    contrast_jitter = 1.0 + rng.normal(0.0, CONTRAST_JITTER, 3)
    gain_jitter = float(np.exp(rng.normal(0.0, GAIN_JITTER)))
    bias_unit = rng.uniform(-1.0, 1.0, N_BIAS_COEFFICIENTS)

    # age-driven atrophy on the template grid
    amount = _atrophy_amount(age)
    # Local distances vary log-normally around the age-driven one, which also makes the volumes
    # smooth functions of age despite the voxel grid.
    modulation = np.exp(ATROPHY_FIELD_LOG_STD * _smooth_field(atrophy_noise, shape))
    labels = base.labels.copy()
    growth_mm = max(VENTRICLE_GROWTH_MM * amount**VENTRICLE_GROWTH_POWER + ventricle_noise, 0.0)
    if growth_mm > 0:
        grow = (
            (base.dist_ventricle <= growth_mm * modulation)
            & ((labels == GM) | (labels == WM))
            & (base.depth_external >= VENTRICLE_WALL_MM)
        )
        labels[grow] = VENTRICLE
    thinning_mm = max(CORTEX_THINNING_MM * amount + cortex_noise, 0.0)
    if thinning_mm > 0:
        labels[(labels == GM) & (base.depth_external < thinning_mm * modulation)] = CSF

    # head size, pose and a smooth elastic deformation (labels: nearest neighbour)
    for border in range(2):  # keep the image borders still (as torchio's RandomElasticDeformation)
        control_points[[border, -1 - border], :, :] = 0
        control_points[:, [border, -1 - border], :] = 0
        control_points[:, :, [border, -1 - border]] = 0
    subject = tio.Subject(
        labels=tio.LabelMap(tensor=torch.from_numpy(labels[None].astype(np.int16)), affine=base.affine)
    )
    spatial = [
        tio.Affine(
            scales=tuple(axis_scales),
            degrees=tuple(degrees),
            translation=tuple(translation),
            default_pad_label=BACKGROUND,
            copy=False,
        )
    ]
    if demo.deformation_mm > 0:
        spatial.append(
            tio.ElasticDeformation(
                control_points=control_points, max_displacement=(demo.deformation_mm,) * 3, copy=False
            )
        )
    subject = tio.Compose(spatial, copy=False)(subject)
    labels = np.rint(subject["labels"].data[0].numpy()).astype(np.uint8)

    # the acquisition: a protocol of the site's scanner, from a stream of its own (the anatomy does not move)
    scanner = scanner_of(site, list(demo.sites))
    protocol_rng = np.random.default_rng([demo.seed, index, PROTOCOL_STREAM])
    protocol = scanner.protocols[int(protocol_rng.integers(len(scanner.protocols)))]

    # label-to-image contrast model
    contrast = site_contrast(site)
    means = np.zeros(5, dtype=np.float32)
    means[[CSF, GM, WM]] = np.array([*protocol.contrast(), 1.0]) * contrast_jitter
    means[VENTRICLE] = means[CSF]
    image = means[labels]
    tissue = labels != BACKGROUND
    image[tissue] += contrast.tissue_noise * rng.standard_normal(int(tissue.sum()), dtype=np.float32)
    partial_volume = tio.Blur(std=(contrast.blur_mm,) * 3, copy=False)
    image = partial_volume(tio.ScalarImage(tensor=torch.from_numpy(image[None]), affine=base.affine))
    image = image.data[0].numpy()
    image = image * _bias_field(bias_unit * contrast.bias_strength, shape)
    wm_level = float(means[WM]) * contrast.gain * gain_jitter
    image = image * (contrast.gain * gain_jitter)
    image, image_affine = _acquire_at_voxel_size(image, base, protocol.voxel_scale)
    sigma = demo.noise_std * wm_level
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imaginary * imaginary).astype(np.float32)

    return DemoSubject(
        participant_id(index), age, sex, site, protocol, scanner.manufacturer, labels, image, base.affine, image_affine
    )


def _acquire_at_voxel_size(image: np.ndarray, base: BaseAnatomy, voxel_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The noiseless image sampled on the protocol's voxel grid (``voxel_scale`` x the template spacing, same
    field of view); torchio's anti-aliasing low-passes it first, the partial-volume averaging of a larger voxel.
    The receiver noise is added afterwards, on that grid."""
    if voxel_scale == 1.0:
        return image, base.affine
    spacing = tuple(float(s) * voxel_scale for s in base.spacing)
    scan = tio.Resample(spacing, antialias=True, copy=False)(
        tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(image)[None]), affine=base.affine)
    )
    return np.clip(scan.data[0].numpy(), 0, None).astype(np.float32), np.asarray(scan.affine, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# the cohort on disk


COLUMN_DESCRIPTIONS = {
    "participant_id": {"Description": "Subject identifier (simulated subject, no real person)."},
    "age": {
        "Description": "Simulated age at scan; drives ventricle enlargement and cortical thinning.",
        "Units": "years",
    },
    "sex": {
        "Description": "Simulated sex; drives head size (M larger than F on average).",
        "Levels": {"F": "female (simulated)", "M": "male (simulated)"},
    },
    "site": {
        "Description": "Simulated acquisition site: a scanner (field strength, vendor-like intensity scale, "
        "blur, bias field and noise) whose protocols are in each image's JSON sidecar."
    },
    "ventricle_ml": {
        "Description": "Lateral ventricle volume of the simulated ground-truth label map (after deformation).",
        "Units": "ml",
    },
    "csf_ml": {"Description": "All CSF (external, sulcal and ventricles) of the simulated label map.", "Units": "ml"},
    "gm_ml": {"Description": "Grey matter volume of the simulated label map.", "Units": "ml"},
    "wm_ml": {"Description": "White matter volume of the simulated label map.", "Units": "ml"},
    "brain_ml": {"Description": "Grey + white matter volume of the simulated label map.", "Units": "ml"},
    "icv_ml": {
        "Description": "Intracranial volume (all non-background labels) of the simulated label map.",
        "Units": "ml",
    },
}
COLUMNS = list(COLUMN_DESCRIPTIONS)


def demo_stamp(params: Params) -> dict:
    """What a cohort on disk was generated from; a different stamp means it must be regenerated."""
    stamp = {
        "generator_version": GENERATOR_VERSION,
        "demo": params.demo.model_dump(mode="json"),
        "sex_levels": _sex_levels(params),
    }
    return json.loads(json.dumps(stamp))


def t1w_path(cohort_dir: Path, index: int) -> Path:
    sub = participant_id(index)
    return Path(cohort_dir) / sub / "anat" / f"{sub}_T1w.nii.gz"


def _dataset_description(params: Params) -> dict:
    return {
        "Name": DESCRIP,
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0 (simulated data derived from the MNI ICBM152 2009a template; see ReferencesAndLinks)",
        "Authors": ["SynthMRI"],
        "HowToAcknowledge": "Simulated data for demonstration and tests only; not for research or clinical use.",
        "ReferencesAndLinks": [
            "ICBM 152 Nonlinear Asymmetric 2009a template (Fonov et al., NeuroImage 2011), as shipped by nilearn",
            "Billot et al., SynthSeg, Medical Image Analysis 2023 (label-to-image synthesis)",
        ],
        "GeneratedBy": [
            {
                "Name": "synthmri.data.demo",
                "Version": __version__,
                "Description": "Simulated T1w brain MRI for demonstration and tests: MNI152 tissue labels, "
                "age-driven atrophy, sex-driven head size, random deformation, tissue contrast "
                "from the protocol's signal equation, per-site gain, bias field and Rician noise. "
                "No real person was scanned.",
            }
        ],
        STAMP_KEY: demo_stamp(params),
    }


_README = """SynthMRI demo cohort (simulated)
================================

Simulated T1-weighted brain MRI for demonstration and tests. No real person was scanned.
Built by synthmri.data.demo from nilearn's MNI152 template: each subject has an age (ventricle
enlargement, cortical thinning), a sex (head size), a site (a simulated scanner: field strength,
vendor-like gain, bias field, noise), a protocol of that scanner (MPRAGE timings, in the image's
JSON sidecar; tissue contrast from its signal equation) and a random smooth deformation. participants.tsv holds the covariates and the ground-truth tissue
volumes measured on each subject's simulated label map (see participants.json).
"""


def _write_subject(params: Params, out_dir: Path, index: int) -> dict:
    """Simulate subject ``index`` and write its image and sidecar; returns its participants row."""
    subject = simulate_subject(params, index)
    image_path = t1w_path(out_dir, index)
    save_nifti(subject.image, subject.image_affine, image_path, descrip=DESCRIP)
    sidecar = image_path.with_name(image_path.name.replace(".nii.gz", ".json"))
    write_text_atomic(sidecar, json.dumps(subject.sidecar(), indent=2) + "\n")
    return subject.row()


def _write_cohort(params: Params, out_dir: Path, workers: int | None = None) -> None:
    """Every subject, ``workers`` processes at once (default: one per available core); subjects are independent."""
    demo = params.demo
    base_anatomy(demo.template_resolution_mm)  # build the shared template once, before the workers fork
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers or cores, demo.n_subjects))
    write = functools.partial(_write_subject, params, out_dir)
    desc = f"Simulating demo subjects ({workers} process{'es' if workers > 1 else ''})"
    if workers == 1:
        rows = [write(index) for index in progress(range(demo.n_subjects), desc=desc, unit="subject")]
    else:
        # fork on Linux: the workers inherit the template already built; spawn elsewhere (fork is unsafe on macOS)
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            rows = list(progress(pool.map(write, range(demo.n_subjects)), desc, "subject", total=demo.n_subjects))
    table = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_path(out_dir / "participants.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep=BIDS_MISSING, float_format="%.3f")
    descriptions = json.loads(json.dumps(COLUMN_DESCRIPTIONS))
    descriptions["sex"]["Levels"] = {
        level: descriptions["sex"]["Levels"].get(level, f"{level} (simulated)") for level in _sex_levels(params)
    }
    descriptions["site"]["Levels"] = {site: "simulated site" for site in demo.sites}
    write_text_atomic(out_dir / "participants.json", json.dumps(descriptions, indent=2) + "\n")
    write_text_atomic(out_dir / "README", _README)
    write_text_atomic(out_dir / "dataset_description.json", json.dumps(_dataset_description(params), indent=2) + "\n")


def _read_stamp(cohort_dir: Path) -> dict | None:
    try:
        description = json.loads((Path(cohort_dir) / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stamp = description.get(STAMP_KEY) if isinstance(description, dict) else None
    return stamp if isinstance(stamp, dict) else None


def _is_replaceable(out_dir: Path) -> bool:
    """Only a missing or empty folder, or a previous demo cohort, may be replaced."""
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    return not any(out_dir.iterdir()) or _read_stamp(out_dir) is not None


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary siblings left by a killed run."""
    for kind in ("tmp", "old"):
        for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def generate_demo_cohort(params: Params, out_dir: Path) -> Path:
    """Write a BIDS folder: dataset_description.json, participants.tsv, participants.json,
    sub-XXX/anat/sub-XXX_T1w.nii.gz. Deterministic from params.demo.seed. Returns out_dir.

    The cohort is written into a temporary sibling folder that replaces ``out_dir`` only when it is
    complete, so a killed run never leaves half a cohort. An existing ``out_dir`` is replaced only if
    it is empty or is itself a demo cohort.
    """
    out_dir = Path(out_dir)
    if not params.demo.sites:
        raise ValueError("demo.sites must name at least one site")
    if not _is_replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a SynthMRI demo cohort; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_cohort(params, tmp)
        os.chmod(tmp, 0o755 & ~_umask())
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "cohort")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "Wrote %d simulated subjects to %s in %.0f s", params.demo.n_subjects, out_dir, time.perf_counter() - started
    )
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_current_demo_cohort(params: Params, out_dir: Path) -> bool:
    """True if ``out_dir`` holds a complete cohort generated from these demo parameters."""
    out_dir = Path(out_dir)
    if _read_stamp(out_dir) != demo_stamp(params) or not (out_dir / "participants.tsv").is_file():
        return False
    return all(t1w_path(out_dir, index).is_file() for index in range(params.demo.n_subjects))


def ensure_demo_cohort(params: Params, out_dir: Path) -> Path:
    """Generate only if out_dir is missing or was generated with different demo params
    (the stamp of params.demo lives in dataset_description.json under 'SynthMRIDemo')."""
    out_dir = Path(out_dir)
    if is_current_demo_cohort(params, out_dir):
        log.info("Demo cohort in %s is up to date (%d subjects)", out_dir, params.demo.n_subjects)
        return out_dir
    reason = "missing" if not out_dir.exists() else "generated with other parameters or incomplete"
    log.info("Demo cohort in %s is %s: generating %d subjects", out_dir, reason, params.demo.n_subjects)
    return generate_demo_cohort(params, out_dir)


# ----------------------------------------------------------------------------------------------
# measurements and figures


def render_demo_figure(cohort_dir: Path, path: Path) -> Path:
    """Three subjects of the cohort (youngest, median age, oldest) as a three-plane grid."""
    cohort_dir = Path(cohort_dir)
    table = pd.read_csv(cohort_dir / "participants.tsv", sep="\t", dtype={"participant_id": str})
    table = table.sort_values("age", kind="stable").reset_index(drop=True)
    picks = [0, (len(table) - 1) // 2, len(table) - 1]
    volumes, titles, spacings = [], [], []
    for pick in picks:
        row = table.iloc[pick]
        sub = row["participant_id"]
        image = nib.as_closest_canonical(nib.load(cohort_dir / sub / "anat" / f"{sub}_T1w.nii.gz"))
        volumes.append(np.asarray(image.dataobj, dtype=np.float32))
        spacings.append(image.header.get_zooms()[:3])
        titles.append(f"{sub}\n{row['age']:.0f} y, {row['sex']}, {row['site']}")
    # sagittal slice through the left lateral ventricle rather than the interhemispheric fissure
    return three_plane_grid(
        volumes,
        titles,
        Path(path),
        affine_spacing=spacings,
        positions=(0.42, 0.5, 0.5),
        suptitle="SynthMRI demo cohort (simulated): youngest, median age, oldest",
    )

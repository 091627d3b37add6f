"""Pluggable feature extractors for distribution metrics (Fréchet distance, MMD, PRDC).

An extractor maps volumes ``(N, D, H, W)`` (float, in ``value_range``, background at its low end) to
feature vectors ``(N, F)``. Its ``name`` identifies the feature space; distances computed in
different feature spaces are not comparable, so the name must be reported next to every number.

Registered extractors (:func:`get_extractor`):

* ``"stats"`` (default): weight-free, offline, fast. Intensity statistics inside the head, 3-class
  Otsu tissue fractions/thresholds/means, GLCM texture on central slices of each axis, head size.
* ``"medicalnet"``: MedicalNet's 3D ResNet-10/18/34 (Chen et al. 2019, "Med3D"), global-average
  pooled 512-d features of its last stage: the "3D FID" of the literature. Weights come from a local
  file (``weights_path``); without one it raises, unless ``allow_random=True`` (tests only), in which
  case the name says "(random weights)".
* ``"lpips"``: 2.5D features of the LPIPS backbone (AlexNet/VGG/SqueezeNet): per-layer global-average
  pooled activations on central slices of the three axes, averaged over the slices of an axis and
  concatenated over layers and axes.

Other extractors: subclass :class:`FeatureExtractor` and :func:`register_extractor` a factory.
"""

from __future__ import annotations

import logging
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from skimage.feature import graycomatrix, graycoprops
from skimage.filters import threshold_multiotsu
from torch import nn

from synthmri.data.masks import head_mask
from synthmri.logs import progress
from synthmri.models.slicing import slice_indices, take_slices

log = logging.getLogger(__name__)

__all__ = [
    "FeatureExtractor",
    "StatsExtractor",
    "MedicalNetExtractor",
    "MedicalNetResNet",
    "LPIPSExtractor",
    "RandomWeightsWarning",
    "head_mask_normalized",
    "as_volumes",
    "get_extractor",
    "register_extractor",
    "available_extractors",
    "load_medicalnet_state_dict",
]


class RandomWeightsWarning(UserWarning):
    """A learned feature extractor runs with random weights: its distances mean little."""


# ----------------------------------------------------------------------------------------------
# helpers


def as_volumes(volumes) -> np.ndarray:
    """``(N, D, H, W)`` float32 from an array ``(N, D, H, W)``/``(N, 1, D, H, W)`` or a list of 3D arrays."""
    if isinstance(volumes, torch.Tensor):
        volumes = volumes.detach().cpu().numpy()
    if isinstance(volumes, (list, tuple)):
        volumes = np.stack([np.asarray(v) for v in volumes]) if len(volumes) else np.zeros((0, 1, 1, 1))
    array = np.asarray(volumes, dtype=np.float32)
    if array.ndim == 5 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 4:
        raise ValueError(f"expected volumes (N, D, H, W), got shape {array.shape}")
    return np.ascontiguousarray(array)


def head_mask_normalized(volume: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Head mask of a volume in ``value_range`` whose background sits at the low end (e.g. -1).

    :func:`synthmri.data.masks.head_mask` (Otsu, largest component, closing, holes filled) is
    made for non-negative scanner intensities, so the volume is shifted to start at 0 first. Falls
    back to "above background" voxels, then to the whole volume, when the mask would be empty.
    """

    volume = np.asarray(volume, dtype=np.float32)
    shifted = volume - np.float32(value_range[0])
    mask = head_mask(shifted) if float(shifted.max()) > float(shifted.min()) else np.zeros(volume.shape, bool)
    if not mask.any():
        mask = shifted > 1e-3 * (value_range[1] - value_range[0])
    if not mask.any():
        mask = np.ones(volume.shape, dtype=bool)
    return mask


class FeatureExtractor(ABC):
    """Maps volumes ``(N, D, H, W)`` to features ``(N, F)`` (float64, finite, deterministic).

    Attributes:
        name: identifies the feature space (e.g. ``"stats"``, ``"medicalnet-resnet10"``); report it
            next to every distance computed on these features.
        feature_names: names of the F columns, when they have names (else ``None``).
    """

    name: str = "extractor"
    feature_names: list[str] | None = None

    #: Volumes per call of :meth:`_extract`; a set larger than one chunk shows a progress bar (a 10,000-volume
    #: set takes minutes). Features are per volume, so chunking does not change them.
    chunk_size: int = 256

    def __call__(self, volumes) -> np.ndarray:
        array = as_volumes(volumes)
        if len(array) == 0:
            raise ValueError(f"{self.name}: no volumes given")
        starts = progress(
            range(0, len(array), self.chunk_size),
            f"Features ({self.name}, {self.chunk_size} volumes a step)",
            "step",
            min_total=2,
        )
        feats = np.concatenate(
            [np.asarray(self._extract(array[s : s + self.chunk_size]), dtype=np.float64) for s in starts]
        )
        if feats.ndim != 2 or feats.shape[0] != len(array):
            raise RuntimeError(f"{self.name}: returned features of shape {feats.shape} for {len(array)} volumes")
        if not np.isfinite(feats).all():
            raise RuntimeError(f"{self.name}: features contain NaN or infinite values")
        return feats

    @abstractmethod
    def _extract(self, volumes: np.ndarray) -> np.ndarray:
        """Features of validated volumes ``(N, D, H, W)`` float32."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------------------------
# "stats": weight-free intensity, tissue and texture features

_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
_AXES = ("axis0", "axis1", "axis2")


class StatsExtractor(FeatureExtractor):
    """Hand-crafted, weight-free features (scipy + scikit-image), computed inside each volume's head mask.

    Features (35 with the defaults; see ``feature_names``):

    * intensity: mean, std, skewness, excess kurtosis (``scipy.stats``), percentiles 1-99;
    * tissue classes: 3-class Otsu (``skimage.filters.threshold_multiotsu``) on in-head intensities:
      the 2 thresholds, the fraction of head voxels in each class (≈ CSF / GM / WM on T1) and the class means;
    * head size: fraction of the grid inside the head mask;
    * texture: GLCM (``skimage.feature.graycomatrix/graycoprops``: contrast, dissimilarity, homogeneity,
      energy, correlation) of ``slices_per_axis`` central slices per axis, intensities quantized to
      ``glcm_levels`` levels inside the head; background pairs are removed from the matrix.
      Averaged over distances, angles and slices, one value per property and axis.

    Args:
        value_range: intensity range of the volumes (background at its low end).
        n_classes: Otsu classes.
        glcm_levels: gray levels of the quantized head intensities.
        slices_per_axis: slices per axis for GLCM (central 60 % of the axis, see ``slice_indices``).
        glcm_distances: pixel distances of the co-occurrences.
    """

    def __init__(
        self,
        value_range: tuple[float, float] = (-1.0, 1.0),
        n_classes: int = 3,
        glcm_levels: int = 32,
        slices_per_axis: int = 3,
        glcm_distances: Sequence[int] = (1, 2),
    ) -> None:
        if n_classes < 2:
            raise ValueError("n_classes must be >= 2")
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.n_classes, self.glcm_levels, self.slices_per_axis = n_classes, glcm_levels, slices_per_axis
        self.glcm_distances = tuple(int(d) for d in glcm_distances)
        self.name = "stats"
        self.feature_names = (
            ["mean", "std", "skewness", "kurtosis"]
            + [f"p{p:02d}" for p in _PERCENTILES]
            + [f"otsu_threshold{i}" for i in range(n_classes - 1)]
            + [f"class{i}_fraction" for i in range(n_classes)]
            + [f"class{i}_mean" for i in range(n_classes)]
            + ["head_fraction"]
            + [f"glcm_{p}_{a}" for a in _AXES for p in _GLCM_PROPS]
        )

    def _tissue_classes(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            thresholds = threshold_multiotsu(values, classes=self.n_classes)
        except ValueError:  # too few distinct values (e.g. a constant head): equal-count classes instead
            thresholds = np.quantile(values, np.arange(1, self.n_classes) / self.n_classes)
        classes = np.digitize(values, thresholds)
        counts = np.bincount(classes, minlength=self.n_classes).astype(np.float64)
        sums = np.bincount(classes, weights=values, minlength=self.n_classes)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), thresholds.mean())
        return thresholds, counts / counts.sum(), means

    def _glcm(self, volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
        lo, hi = self.value_range
        levels = self.glcm_levels
        quantized = 1 + np.floor((volume - lo) / (hi - lo) * levels).clip(0, levels - 1).astype(np.uint8)
        quantized[~mask] = 0  # background level, removed from the co-occurrence matrices below
        angles = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
        out = []
        for axis, positions in enumerate(slice_indices(volume.shape, self.slices_per_axis)):
            per_slice = []
            for pos in positions.tolist():
                image = np.take(quantized, pos, axis=axis)
                matrix = graycomatrix(
                    image, self.glcm_distances, angles, levels=levels + 1, symmetric=True, normed=False
                ).astype(np.float64)
                matrix[0, :] = 0
                matrix[:, 0] = 0
                if matrix.sum() == 0:  # slice outside the head
                    continue
                with np.errstate(invalid="ignore", divide="ignore"):
                    per_slice.append([np.nanmean(graycoprops(matrix, prop)) for prop in _GLCM_PROPS])
            out.extend(np.nan_to_num(np.nanmean(per_slice, axis=0)) if per_slice else np.zeros(len(_GLCM_PROPS)))
        return np.asarray(out, dtype=np.float64)

    def features_of(self, volume: np.ndarray) -> np.ndarray:
        """Features of one volume ``(D, H, W)``."""
        volume = np.asarray(volume, dtype=np.float32)
        mask = head_mask_normalized(volume, self.value_range)
        values = volume[mask].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # constant input: skew/kurtosis NaN -> 0 below
            moments = [values.mean(), values.std(), stats.skew(values), stats.kurtosis(values)]
        thresholds, fractions, means = self._tissue_classes(values)
        feats = np.concatenate(
            [
                np.nan_to_num(np.asarray(moments, dtype=np.float64)),
                np.percentile(values, _PERCENTILES),
                thresholds,
                fractions,
                means,
                [mask.mean()],
                self._glcm(volume, mask),
            ]
        )
        return feats

    def _extract(self, volumes: np.ndarray) -> np.ndarray:
        return np.stack([self.features_of(v) for v in volumes])


# ----------------------------------------------------------------------------------------------
# "medicalnet": MedicalNet 3D ResNet (Tencent/MedicalNet, models/resnet.py), feature trunk only

_MEDICALNET_LAYERS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
# Shortcut type of the published checkpoints (MedicalNet README): resnet_10 "B", resnet_18/34 "A".
_MEDICALNET_SHORTCUT = {10: "B", 18: "A", 34: "A"}


def _conv3x3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(
        in_planes, out_planes, kernel_size=3, dilation=dilation, stride=stride, padding=dilation, bias=False
    )


class _ZeroPadShortcut(nn.Module):
    """Shortcut type "A": strided identity with zero-padded extra channels (no parameters)."""

    def __init__(self, planes: int, stride: int) -> None:
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, :, :: self.stride, :: self.stride, :: self.stride] if self.stride > 1 else x
        return F.pad(out, (0, 0, 0, 0, 0, 0, 0, self.planes - out.shape[1]))


class _BasicBlock(nn.Module):
    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3x3(inplanes, planes, stride=stride, dilation=dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class MedicalNetResNet(nn.Module):
    """MedicalNet's 3D ResNet trunk with BasicBlocks (depth 10, 18 or 34), same module names as the
    published checkpoints (``conv1``, ``bn1``, ``layer1..4``; the segmentation head ``conv_seg`` is left out).

    conv1 7×7×7 stride 2 → BN → ReLU → max-pool 3 stride 2 → layer1 (64) → layer2 (128, stride 2) →
    layer3 (256, dilation 2) → layer4 (512, dilation 4) → global average pool → ``(B, 512)``.
    Input: ``(B, 1, D, H, W)``, z-scored as MedicalNet's training data.
    """

    def __init__(self, depth: int = 10, shortcut_type: str | None = None) -> None:
        super().__init__()
        if depth not in _MEDICALNET_LAYERS:
            raise ValueError(f"MedicalNet depth must be one of {sorted(_MEDICALNET_LAYERS)}, got {depth}")
        shortcut_type = shortcut_type or _MEDICALNET_SHORTCUT[depth]
        if shortcut_type not in ("A", "B"):
            raise ValueError(f"shortcut_type must be 'A' or 'B', got {shortcut_type!r}")
        self.depth, self.shortcut_type = depth, shortcut_type
        self.inplanes = 64
        self.conv1 = nn.Conv3d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        layers = _MEDICALNET_LAYERS[depth]
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], dilation=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=4)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut_type == "A":
                downsample = _ZeroPadShortcut(planes, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm3d(planes)
                )
        layers = [_BasicBlock(self.inplanes, planes, stride=stride, dilation=dilation, downsample=downsample)]
        self.inplanes = planes
        layers += [_BasicBlock(planes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))


def load_medicalnet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The trunk's tensors from a MedicalNet checkpoint (``{'state_dict': {'module.conv1.weight': ...}}``
    or a bare state dict), ``module.`` prefixes stripped, the segmentation head (``conv_seg``) and any
    ``fc`` classifier dropped. Loaded with ``torch.load(weights_only=True)``."""
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: not a MedicalNet checkpoint (expected a state dict of tensors)")
    state = {re.sub(r"^(module\.)+", "", key): value for key, value in checkpoint.items()}
    return {k: v for k, v in state.items() if not k.startswith(("conv_seg.", "fc."))}


def _infer_depth(state: dict[str, torch.Tensor]) -> int:
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    for depth, layers in _MEDICALNET_LAYERS.items():
        if tuple(blocks) == layers:
            return depth
    raise ValueError(
        f"checkpoint has {blocks} BasicBlocks per stage, which matches no MedicalNet depth "
        f"({ {d: list(v) for d, v in _MEDICALNET_LAYERS.items()} })"
    )


class MedicalNetExtractor(FeatureExtractor):
    """512-d MedicalNet features ("3D FID").

    Each volume is z-scored inside its head mask with the background set to 0 (MedicalNet's training
    normalization, with zeros instead of its random background noise, so features are deterministic),
    then fed whole to the network (eval mode, no gradients).

    Args:
        weights_path: MedicalNet checkpoint (``resnet_10.pth``, ``resnet_10_23dataset.pth``,
            ``resnet_18*.pth``, ``resnet_34*.pth``). Depth and shortcut type are read from it unless given.
        depth: 10, 18 or 34; ``None``: from the checkpoint (10 with random weights).
        shortcut_type: ``"A"``/``"B"``; ``None``: from the checkpoint / the published default of the depth.
        allow_random: with no weights file, use seeded random weights (for tests) instead of raising;
            the name then ends in ``(random weights)`` and a :class:`RandomWeightsWarning` is issued.
        seed: seed of the random initialization (a forked RNG; the global RNG is untouched).
        batch_size, device: inference settings.
        value_range: intensity range of the volumes (for the head mask).

    Raises:
        FileNotFoundError: no weights file and ``allow_random`` is false.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        depth: int | None = None,
        shortcut_type: str | None = None,
        allow_random: bool = False,
        seed: int = 0,
        batch_size: int = 2,
        device: str | torch.device = "cpu",
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        path = Path(weights_path).expanduser() if weights_path is not None else None
        state = None
        if path is not None and path.is_file():
            state = load_medicalnet_state_dict(path)
            depth = depth or _infer_depth(state)
            if shortcut_type is None:
                shortcut_type = "B" if any(".downsample." in k for k in state) else "A"
        elif not allow_random:
            where = f"'{path}' does not exist" if path is not None else "no weights_path was given"
            raise FileNotFoundError(
                f"MedicalNet weights: {where}. They cannot be downloaded here; get resnet_10.pth / resnet_18.pth "
                "(or *_23dataset.pth) from Tencent/MedicalNet and pass its local path as weights_path. "
                "(allow_random=True runs with random weights, for tests only.)"
            )
        depth = depth or 10
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MedicalNetResNet(depth, shortcut_type)
        if state is not None:
            result = model.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"{path} does not fit MedicalNet ResNet-{depth} (shortcut {model.shortcut_type}): "
                    f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
                )
            self.name = f"medicalnet-resnet{depth}"
            self.weights = str(path)
            log.info("MedicalNet ResNet-%d features, weights from %s", depth, path)
        else:
            self.name = f"medicalnet-resnet{depth}(random weights)"
            self.weights = None
            why = f"'{path}' does not exist" if path is not None else "no weights_path"
            message = (
                f"MedicalNet extractor runs with RANDOM weights (seed {seed}; {why}): its distances are NOT "
                "the '3D FID' of the literature and are only fit for tests"
            )
            warnings.warn(message, RandomWeightsWarning, stacklevel=2)
            log.warning(message)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.depth, self.batch_size, self.value_range = depth, batch_size, value_range

    def preprocess(self, volume: np.ndarray) -> np.ndarray:
        mask = head_mask_normalized(volume, self.value_range)
        values = volume[mask]
        out = np.zeros_like(volume, dtype=np.float32)
        out[mask] = (values - values.mean()) / max(float(values.std()), 1e-6)
        return out

    @torch.no_grad()
    def _extract(self, volumes: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(volumes), self.batch_size):
            batch = np.stack([self.preprocess(v) for v in volumes[start : start + self.batch_size]])
            out.append(self.model(torch.from_numpy(batch[:, None]).to(self.device)).double().cpu().numpy())
        return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# "lpips": 2.5D features of the LPIPS backbone


class LPIPSExtractor(FeatureExtractor):
    """2.5D LPIPS-backbone features.

    Slices: ``slices_per_axis`` evenly spaced central slices per axis (``synthmri.models.slicing``),
    each grayscale slice repeated to RGB, enlarged bilinearly if its short side is below ``min_size``,
    passed through LPIPS' input scaling layer and backbone. Each layer's activations are global-average
    pooled; features = per axis, the mean over its slices of the concatenated layer vectors; the three
    axes concatenated (3 × 1152 = 3456 for AlexNet).

    Backbone weights follow :func:`synthmri.losses.perceptual.build_lpips` (explicit file, torch hub
    cache, or a seeded random backbone with a warning); with a random backbone the name ends in
    ``(random weights)``.
    """

    def __init__(
        self,
        net: str = "alex",
        weights_path: str | Path | None = None,
        seed: int = 0,
        slices_per_axis: int = 4,
        min_size: int = 32,
        batch_size: int = 4,
        device: str | torch.device = "cpu",
    ) -> None:
        from synthmri.losses.perceptual import build_lpips

        model, description = build_lpips(net, weights_path, seed)
        self.description = description
        self.random = "RANDOM" in description
        self.name = f"lpips-{net}" + ("(random weights)" if self.random else "")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.slices_per_axis, self.min_size, self.batch_size = slices_per_axis, min_size, batch_size

    def _layer_features(self, slices: torch.Tensor) -> torch.Tensor:
        x = slices.expand(-1, 3, -1, -1)
        short = min(x.shape[2:])
        if short < self.min_size:
            size = [int(np.ceil(s * self.min_size / short)) for s in x.shape[2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        outputs = self.model.net(self.model.scaling_layer(x))
        return torch.cat([o.mean(dim=(2, 3)) for o in outputs], dim=1)

    @torch.no_grad()
    def _extract(self, volumes: np.ndarray) -> np.ndarray:
        indices = slice_indices(volumes.shape[1:], self.slices_per_axis)
        out = []
        for start in range(0, len(volumes), self.batch_size):
            x = torch.from_numpy(volumes[start : start + self.batch_size][:, None]).to(self.device)
            per_axis = []
            for slices in take_slices(x, indices):  # (B*k, 1, h, w), batch-major
                feats = self._layer_features(slices)
                per_axis.append(feats.reshape(len(x), self.slices_per_axis, -1).mean(dim=1))
            out.append(torch.cat(per_axis, dim=1).double().cpu().numpy())
        return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {
    "stats": StatsExtractor,
    "medicalnet": MedicalNetExtractor,
    "lpips": LPIPSExtractor,
}


def register_extractor(name: str, factory: Callable[..., FeatureExtractor]) -> None:
    """Make ``get_extractor(name, **kwargs)`` return ``factory(**kwargs)``."""
    _REGISTRY[name] = factory


def available_extractors() -> list[str]:
    return sorted(_REGISTRY)


def get_extractor(name: str = "stats", **kwargs) -> FeatureExtractor:
    """A feature extractor by registry name (``"stats"``, ``"medicalnet"``, ``"lpips"``), built with ``kwargs``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown feature extractor '{name}', expected one of {available_extractors()}") from None
    return factory(**kwargs)

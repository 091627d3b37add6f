"""Light geometry of MNI-space brain volumes (numpy only): world coordinates of voxels, the box around the
lateral ventricles, and the image-only ventricle size that the demo cohort's ground truth and the report's
conditioning check both use. Kept out of the demo generator so metrics can import it without torchio or
nilearn."""

from __future__ import annotations

import numpy as np

# Central box (MNI mm) around the lateral ventricles, for image-only ventricle measurements.
VENTRICLE_BOX_MM = ((-28.0, 28.0), (-50.0, 36.0), (-6.0, 34.0))


def world_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> list[np.ndarray]:
    """World (mm) x, y, z of every voxel centre, as three broadcastable arrays for axis-aligned grids."""
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        index = np.indices(shape).reshape(3, -1)
        world = affine[:3, :3] @ index + affine[:3, 3:4]
        return [w.reshape(shape) for w in world]
    coords = []
    for axis in range(3):
        values = affine[axis, axis] * np.arange(shape[axis]) + affine[axis, 3]
        view = [1, 1, 1]
        view[axis] = shape[axis]
        coords.append(values.reshape(view))
    return coords


def in_ventricle_box(shape: tuple[int, ...], affine: np.ndarray, box=VENTRICLE_BOX_MM) -> np.ndarray:
    x, y, z = world_coordinates(shape, affine)
    return (
        (box[0][0] <= x) & (x <= box[0][1]) & (box[1][0] <= y) & (y <= box[1][1]) & (box[2][0] <= z) & (z <= box[2][1])
    )


def ventricle_proxy_ml(volume: np.ndarray, affine: np.ndarray, threshold: float = 0.5) -> float:
    """Image-only ventricle size: volume of CSF-dark voxels in a central box around the lateral
    ventricles (MNI mm), dark meaning below ``threshold`` x the box's 95th intensity percentile
    (white matter). Needs an image roughly in MNI space, e.g. the demo cohort or its samples."""
    volume = np.asarray(volume, dtype=np.float32)
    inside = in_ventricle_box(volume.shape, np.asarray(affine, dtype=np.float64))
    values = volume[inside]
    if values.size == 0:
        return 0.0
    reference = float(np.percentile(values, 95))
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    return float((values < threshold * reference).sum()) * voxel_ml

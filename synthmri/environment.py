"""The software a data set was made with: resolved versions of the packages that decide its bytes.

``dvc.lock`` pins the data, code and parameters of a version; these versions complete the recipe (the
same lock under another torch or diffusers can give other volumes). The sample stage writes them next to
the set and into its card, and publishing copies them into ``release.json``. ``constraints.txt`` pins
them for ``make demo``/``make test`` (README, "A reproducible environment").
"""

from __future__ import annotations

from importlib import metadata

KEY_PACKAGES = (
    "synthmri",
    "torch",
    "diffusers",
    "numpy",
    "scipy",
    "nibabel",
    "torchio",
    "scikit-image",
    "lpips",
    "dvc",
    "prefect",
    "mlflow",
)


def software_versions(packages: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    """``{package: installed version}`` ("not installed" for an absent one)."""
    versions = {}
    for name in packages:
        if name == "torch":  # torch.__version__ carries the build (e.g. +cu130) that its metadata may not
            import torch

            versions[name] = torch.__version__
            continue
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions

"""Data-only list of the model bundles shipped with conus.

This module feeds argparse choices (``--model``) and must stay import-light: no TensorFlow,
no numpy. Each entry names a folder under the shipped models directory (``models/`` at the
repository root, or ``$CONUS_MODELS_DIR`` when set, e.g. inside the container), the task the
model performs, a one-line description, and whether it is the default for its task.

An entry's ``task`` is the *role* the bundle plays in the pipeline ("segmentation",
"centerline" or "levels"), which may differ from the ``task`` in the bundle's own metadata:
the "centerline" role is served by a one-channel centerline model or by a multi-channel
"spine" model (cord, discs, anchors), the "levels" role (disc heatmaps for ``--levels auto``)
by a spine model, see :data:`ROLE_TASKS`.
"""

from __future__ import annotations

import os
from pathlib import Path

from bids_app.errors import BundleError

#: name -> {folder (relative to the models directory), task (role), description, default}
SHIPPED_BUNDLES: dict[str, dict] = {
    "seg-general": {
        "folder": "seg-general",
        "task": "segmentation",
        "description": "3D U-Net (base 8, depth 3) cord segmentation at 0.5x0.5x1.0 mm, all regions, "
        "trained on synthetic images only",
        "default": True,
    },
    "seg-lumbosacral": {
        "folder": "seg-lumbosacral",
        "task": "segmentation",
        "description": "seg-general fine-tuned on lumbosacral and below-conus crops (lumbar enlargement, "
        "conus, cauda equina): the lumbosacral specialist for --lumbosacral-model or --model",
        "default": False,
    },
    "spine-coarse": {
        "folder": "spine-coarse",
        "task": "centerline",
        "description": "coarse 3D U-Net at 1.5 mm over the whole field of view with three outputs (cord "
        "heatmap for the global centerline fit, intervertebral discs for --levels auto, C2/sacrum anchors)",
        "default": True,
    },
    "centerline-coarse": {
        "folder": "centerline-coarse",
        "task": "centerline",
        "description": "coarse 3D U-Net cord heatmap at 1.5 mm isotropic over the whole field of view, "
        "input to the global centerline fit (the previous default; no discs)",
        "default": False,
    },
}

#: role (registry ``task``) -> the bundle metadata tasks that can serve it
ROLE_TASKS: dict[str, tuple[str, ...]] = {
    "segmentation": ("segmentation",),
    "centerline": ("centerline", "spine"),
    "levels": ("spine",),
}

#: roles the participant level cannot run without (each needs a default shipped bundle);
#: "levels" (disc heatmaps for ``--levels auto``) is optional
REQUIRED_ROLES = ("segmentation", "centerline")

TASKS = tuple(ROLE_TASKS)


def serves(role: str, bundle_task: str) -> bool:
    """True when a bundle whose metadata task is ``bundle_task`` can play ``role``."""
    return bundle_task in ROLE_TASKS.get(role, ())


def models_dir() -> Path:
    """Folder holding the shipped bundles: ``$CONUS_MODELS_DIR`` or ``<repository>/models``."""
    env = os.environ.get("CONUS_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models"


def bundle_names(task: str | None = None) -> list[str]:
    """Names of shipped bundles, optionally only those for ``task`` (argparse choices)."""
    return [name for name, entry in SHIPPED_BUNDLES.items() if task is None or entry["task"] == task]


def default_bundle(task: str, required: bool = True) -> str | None:
    """Name of the default shipped bundle for the role ``task`` ("segmentation", "centerline",
    "levels"); None for a role without one when not ``required``."""
    for name, entry in SHIPPED_BUNDLES.items():
        if entry["task"] == task and entry["default"]:
            return name
    if not required:
        return None
    raise BundleError(f"no default bundle for task {task!r}; shipped: {', '.join(SHIPPED_BUNDLES)}")


def bundle_folder(name: str) -> Path:
    """Absolute folder of the shipped bundle ``name`` (BundleError when unknown)."""
    if name not in SHIPPED_BUNDLES:
        raise BundleError(f"unknown model {name!r}; shipped models: {', '.join(SHIPPED_BUNDLES)}")
    return models_dir() / SHIPPED_BUNDLES[name]["folder"]

"""Dataset loaders: each module turns one dataset's folder layout into training and test items.

``LOADERS`` maps the CLI's dataset NAME to its loader class. mpdd, wfdd, mad (MAD-man, MAD-sys) and custom
folders share the MVTec AD layout; mvtec3d, loco and btad are small adapters of it. Each loader lists its
classes in ``CLASSNAMES``.
"""
from __future__ import annotations

import importlib

LOADERS = {
    "mvtec": ("datasets.mvtec", "MVTecDataset"),
    "mpdd": ("datasets.mvtec", "MVTecDataset"),
    "wfdd": ("datasets.mvtec", "MVTecDataset"),
    "mad": ("datasets.mvtec", "MVTecDataset"),
    "custom": ("datasets.mvtec", "MVTecDataset"),
    "visa": ("datasets.visa", "VisADataset"),
    "mvtec3d": ("datasets.mvtec3d", "MVTec3DDataset"),
    "loco": ("datasets.loco", "LOCODataset"),
    "btad": ("datasets.btad", "BTADDataset"),
}


def loader_class(name: str) -> type:
    """The dataset class of a dataset NAME (its module is imported on first use); KeyError for unknown names."""
    module_name, class_name = LOADERS[name]
    return getattr(importlib.import_module(module_name), class_name)

"""MVTec 3D-AD (RGB images only) as GLASS items: the MVTec AD loader with ``rgb/`` and ``gt/`` subfolders.

Layout: ``<source>/<class>/train/good/rgb/*.png``, ``<source>/<class>/test/<type>/rgb/*.png`` and the
masks ``<source>/<class>/test/<type>/gt/<stem>.png`` (0/255, the image's size). The ``xyz/`` point clouds
and the ``validation/`` split are not used. A class already flattened to the MVTec AD layout
(``train/good/*.png``, ``ground_truth/<type>/<stem>_mask.png``) is read as well.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from datasets.mvtec import DatasetSplit, Mask, MVTecDataset

MVTEC3D_CLASSES = ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire")
CLASSNAMES: Dict[str, Tuple[str, ...]] = {"mvtec3d": MVTEC3D_CLASSES}


class MVTec3DDataset(MVTecDataset):
    """A class of MVTec 3D-AD: images in ``<split>/<type>/rgb``, masks in ``test/<type>/gt``."""

    LAYOUT = "MVTec 3D-AD"
    CLASSNAMES = CLASSNAMES

    def image_folder(self, split_dir: str, folder: str) -> str:
        rgb = os.path.join(split_dir, folder, "rgb")
        return rgb if os.path.isdir(rgb) else super().image_folder(split_dir, folder)

    def find_masks(self, folder: str, image_paths: Sequence[str]) -> List[Mask]:
        gt = os.path.join(self.class_dir(), DatasetSplit.TEST.value, folder, "gt")
        if os.path.isdir(gt):
            return self.masks_by_name(image_paths, gt, naming="name each mask like its image, gt/<image name>.png")
        return super().find_masks(folder, image_paths)

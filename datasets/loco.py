"""MVTec LOCO AD as GLASS items: the MVTec AD loader with a folder of masks per defect image.

Layout: ``<source>/<class>/train/good``, ``<source>/<class>/test/{good,logical_anomalies,
structural_anomalies}`` and ``<source>/<class>/ground_truth/<type>/<stem>/000.png, 001.png, ...``: one
mask per defect region, their union (non-zero = defect) is the image's mask. Logical and structural
anomalies are both scored, in one test set. The ``validation/good`` images are not used (GLASS selects
its model on the test set, as the reference does).
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from datasets.mvtec import Mask, MVTecDataset, list_images, subfolders

LOCO_CLASSES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
CLASSNAMES: Dict[str, Tuple[str, ...]] = {"loco": LOCO_CLASSES}


class LOCODataset(MVTecDataset):
    """A class of MVTec LOCO AD: the masks of a test image are the files of ``ground_truth/<type>/<stem>/``."""

    LAYOUT = "MVTec LOCO AD"
    CLASSNAMES = CLASSNAMES

    def find_masks(self, folder: str, image_paths: Sequence[str]) -> List[Mask]:
        gt_dir = os.path.join(self.class_dir(), "ground_truth", folder)
        mask_dirs = subfolders(gt_dir) if os.path.isdir(gt_dir) else []
        if not mask_dirs:  # masks as files, as in the MVTec AD layout
            return super().find_masks(folder, image_paths)
        masks: List[Mask] = []
        for image_path in image_paths:
            stem = os.path.splitext(os.path.basename(image_path))[0]
            files = tuple(list_images(os.path.join(gt_dir, stem), broken_links=True))
            masks.append(files or None)
        if not any(masks):
            self.layout_problems.add(
                "mask folder matching no image", self.relative(gt_dir), plural="mask folders matching no image",
                hint="put the masks of image <name>.png in ground_truth/<type>/<name>/",
            )
        return masks

"""MVTec AD-layout folders: MVTec AD, MPDD, WFDD, MAD (MAD-man, MAD-sys) and any custom data.

Layout: ``<source>/<class>/train/good/*``, ``<source>/<class>/test/<type>/*`` and
``<source>/<class>/ground_truth/<type>/<stem>_mask.png``; optional foreground masks in
``<source>/fg_mask/<class>/<image file name>``. The MVTec 3D-AD, MVTec LOCO and BTAD loaders are small
adapters of this one (``datasets/mvtec3d.py``, ``loco.py``, ``btad.py``); training items, test items and the
layout check live in ``datasets/base.py``.

Differences from the reference, all deliberate:
  * a test image is paired with its mask by file name (``<stem>_mask.*`` or ``<stem>.*``), not by
    position in two sorted lists, so a missing or extra mask cannot shift the pairing;
  * only image files are read (``.png .jpg .jpeg .bmp .tif .tiff``, any case), textures may be
    ``.jpg .jpeg .png`` (any case);
  * every non-zero mask pixel is a defect (a 0/1 mask works like a 0/255 one); the mask is then resized
    bilinearly like the reference's, so its edges stay fractional;
  * a defect image without a mask is accepted: its ground truth is unknown, it is left out of the pixel
    metrics, and without any mask the pixel metrics are not available (the reference crashes);
  * the layout is checked before training and all problems are reported at once (GlassError).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from datasets.base import (  # noqa: F401  (DatasetSplit re-exported: the loaders' users import it from here)
    AnomalyDataset,
    DatasetSplit,
    Mask,
    IMAGE_EXTENSIONS,
    is_broken_link,
    list_images,
    other_files,
    subfolders,
)
from utils import GlassError

LOGGER = logging.getLogger(__name__)

MVTEC_CLASSES = (
    "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut", "metal_nut",
    "pill", "screw", "toothbrush", "transistor", "zipper",
)
MPDD_CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
WFDD_CLASSES = ("grey_cloth", "grid_cloth", "yellow_cloth", "pink_flower")
# The classes of each dataset name this loader serves (``custom``: whatever folders there are).
# MAD-man and MAD-sys hold the MVTec AD classes (tested with MVTec AD checkpoints, so run as ``mvtec``).
CLASSNAMES: Dict[str, Tuple[str, ...]] = {
    "mvtec": MVTEC_CLASSES,
    "mad": MVTEC_CLASSES,
    "mpdd": MPDD_CLASSES,
    "wfdd": WFDD_CLASSES,
    "custom": (),
}
# Classes whose images are resized by 329/288 before the centre crop (unless distribution == 1).
ENLARGED_CLASSES = ("toothbrush", "wood")
MASK_NAMING = "name each mask like its image, <image name>_mask.png"


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def match_masks(image_paths: Sequence[str], mask_folder: str) -> Tuple[List[Optional[str]], List[str]]:
    """The mask of each image (None if it has none) and the masks that match no image.

    Matching is by file stem: ``<stem>_mask.png`` is preferred, then ``<stem>_mask.<any>``,
    ``<stem>.png`` and ``<stem>.<any>``. A missing folder means no masks.
    """
    by_stem: Dict[str, List[str]] = {}
    for path in list_images(mask_folder, broken_links=True):
        by_stem.setdefault(_stem(path), []).append(path)

    def best(stem: str) -> Optional[str]:
        paths = by_stem.get(stem, [])
        pngs = [p for p in paths if p.lower().endswith(".png")]
        return (pngs or paths or [None])[0]

    masks = []
    for image_path in image_paths:
        stem = _stem(image_path)
        masks.append(best(stem + "_mask") or best(stem))
    used = set(masks)
    unmatched = [p for paths in by_stem.values() for p in paths if p not in used]
    return masks, sorted(unmatched)


class MVTecDataset(AnomalyDataset):
    """A class folder in MVTec AD layout as GLASS training or test items (see ``datasets.base``)."""

    # Folder names of defect-free images (their ``anomaly`` is ``NORMAL``).
    NORMAL_FOLDERS: Tuple[str, ...] = ("good",)
    ENLARGED_CLASSES = ENLARGED_CLASSES
    LAYOUT = "MVTec AD"
    CLASSNAMES = CLASSNAMES

    # ------------------------------------------------------------------------------------------
    # Where the files are (the adapters override these)

    def class_dir(self) -> str:
        """``<source>/<class>``; GlassError naming the available classes when it is missing."""
        path = os.path.join(self.source, self.classname)
        if not os.path.isdir(path):
            found = [d for d in subfolders(self.source) if d not in ("fg_mask", "split_csv")]
            if {"train", "test"} <= set(found):
                raise GlassError(
                    f"class '{self.classname}' not found in {self.source}, which looks like a class folder itself "
                    f"(train/, test/): give its parent folder as DATA_PATH and -d {os.path.basename(os.path.abspath(self.source))}"
                )
            known = self.CLASSNAMES.get(self.dataset_name, ())
            if "," in self.classname:
                raise GlassError(f"class '{self.classname}' not found in {self.source}: give each class with its own -d "
                                 f"(-d {' -d '.join(name.strip() for name in self.classname.split(','))})")
            raise GlassError(
                f"class '{self.classname}' not found in {self.source}: available classes are "
                f"{', '.join(found) if found else '(none)'}"
                + (f" (the {self.dataset_name} classes are {', '.join(known)})" if known else "")
            )
        return path

    def image_folder(self, split_dir: str, folder: str) -> str:
        """The folder holding the images of ``<split>/<folder>``."""
        return os.path.join(split_dir, folder)

    def find_masks(self, folder: str, image_paths: Sequence[str]) -> List[Mask]:
        """The masks of the test images of defect type ``folder`` (None where there is none)."""
        mask_folder = os.path.join(self.class_dir(), "ground_truth", folder)
        if os.path.isdir(mask_folder) and subfolders(mask_folder) and not list_images(mask_folder):
            self.layout_problems.add("mask folder of folders", self.relative(mask_folder),
                                     plural="mask folders of folders",
                                     hint="a folder of masks per image is the MVTec LOCO AD layout: use the dataset "
                                          "name loco")
            return [None] * len(image_paths)
        return self.masks_by_name(image_paths, mask_folder)

    def masks_by_name(self, image_paths: Sequence[str], mask_folder: str, naming: str = MASK_NAMING) -> List[Mask]:
        """Masks paired by file name; a mask folder none of whose files matches an image is a problem."""
        masks, unmatched = match_masks(image_paths, mask_folder)
        if unmatched:
            if image_paths and not any(masks):
                self.layout_problems.add(
                    "mask folder matching no image", self.relative(mask_folder),
                    plural="mask folders matching no image", hint=naming,
                )
            else:
                LOGGER.info("%s: %d mask(s) match no test image (first: %s)", mask_folder, len(unmatched), unmatched[0])
        return list(masks)

    # ------------------------------------------------------------------------------------------

    def _collect_items(self) -> List[list]:
        """``[classname, anomaly, image_path, mask]`` for every image of the split, in sorted order."""
        class_dir = self.class_dir()
        problems = self.layout_problems
        split_dir = os.path.join(class_dir, self.split.value)
        train = self.split == DatasetSplit.TRAIN
        if not os.path.isdir(split_dir):
            problems.add("missing folder", self.relative(split_dir),
                         hint="a class folder needs train/good and test/<good|defect type> folders")
            return []
        folders = subfolders(split_dir)
        for name in sorted(os.listdir(split_dir)):
            if not name.startswith(".") and is_broken_link(os.path.join(split_dir, name)):
                problems.add("folder that is a broken link", self.relative(os.path.join(split_dir, name)),
                             plural="folders that are broken links", hint="fix the links or remove them")
        loose = [self.relative(path) for path in other_files(split_dir, extensions=())]
        if loose:
            LOGGER.warning("%s: %d file(s) left out, directly in %s and not in one of its <good|defect type> folders: %s",
                           self.classname, len(loose), self.relative(split_dir),
                           ", ".join(loose[:3]) + (", ..." if len(loose) > 3 else ""))
        if train and not any(folder in self.NORMAL_FOLDERS for folder in folders):
            problems.add("missing training folder", self.relative(os.path.join(split_dir, self.NORMAL_FOLDERS[0])),
                         hint="put the defect-free training images there")

        items, misnamed, empty, left_out = [], False, [], []
        for folder in folders:
            anomaly = self.NORMAL if folder in self.NORMAL_FOLDERS else folder
            image_paths = list_images(self.image_folder(split_dir, folder), broken_links=True)
            left_out.extend(self.relative(path) for path in other_files(self.image_folder(split_dir, folder)))
            if not image_paths and os.path.isdir(os.path.join(self.image_folder(split_dir, folder), "rgb")):
                misnamed = True
                problems.add("folder with its images in rgb/", self.relative(self.image_folder(split_dir, folder)),
                             plural="folders with their images in rgb/",
                             hint="that is the MVTec 3D-AD layout: use the dataset name mvtec3d")
            elif train and anomaly == self.NORMAL and not image_paths:
                problems.add("training folder without images", self.relative(self.image_folder(split_dir, folder)),
                             hint="no training images: put the defect-free images there")
            elif not train and not image_paths:
                empty.append(self.relative(self.image_folder(split_dir, folder)))
            if not train and anomaly != self.NORMAL and image_paths:
                masks = self.find_masks(folder, image_paths)
            else:
                masks = [None] * len(image_paths)
            items.extend([self.classname, anomaly, p, m] for p, m in zip(image_paths, masks))
        if not train and not items and not misnamed:
            problems.add("test folder without images", self.relative(split_dir),
                         hint=f"expected {self.split.value}/<good|defect type>/*.png")
        elif empty:
            LOGGER.warning("%s: %s without images, skipped (with their masks, if any)", self.classname,
                           ", ".join(empty))
        if left_out:
            shown = ", ".join(left_out[:3]) + (", ..." if len(left_out) > 3 else "")
            LOGGER.warning("%s: %d file(s) left out, not of the image kinds read (%s): %s; convert them to PNG to use them",
                           self.classname, len(left_out), " ".join(IMAGE_EXTENSIONS), shown)
        return items

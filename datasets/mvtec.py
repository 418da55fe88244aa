"""MVTec AD-style folders as training items (with synthesised anomalies) and test items (with masks).

Layout: ``<source>/<class>/train/good/*``, ``<source>/<class>/test/<type>/*`` and
``<source>/<class>/ground_truth/<type>/<stem>_mask.png``; optional foreground masks in
``<source>/fg_mask/<class>/<image file name>``. The same loader serves MPDD and WFDD.

Differences from the reference, all deliberate:
  * a test image is paired with its mask by file name (``<stem>_mask.*`` or ``<stem>.*``), not by
    position in two sorted lists, so a missing or extra mask cannot shift the pairing;
  * only image files are read (``.png .jpg .jpeg .bmp .tif .tiff``, any case), textures may be
    ``.jpg .jpeg .png`` (any case);
  * ``mask_gt`` is binary (resized mask > 0.5); the reference keeps the bilinear values;
  * user mistakes (missing folders, missing masks, unreadable files) raise ``GlassError`` at once.
"""
from __future__ import annotations

import logging
import os
from enum import Enum
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from torchvision import transforms

import utils
from perlin import perlin_mask
from utils import IMAGENET_MEAN, IMAGENET_STD, GlassError

LOGGER = logging.getLogger(__name__)

_CLASSNAMES = [
    "carpet",
    "grid",
    "leather",
    "tile",
    "wood",
    "bottle",
    "cable",
    "capsule",
    "hazelnut",
    "metal_nut",
    "pill",
    "screw",
    "toothbrush",
    "transistor",
    "zipper",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TEXTURE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Classes whose images are resized by 329/288 before the centre crop (unless distribution == 1).
ENLARGED_CLASSES = ("toothbrush", "wood")
# The xlsx shipped with the project, consulted after the ones passed in (the reference reads it).
SHIPPED_EXCEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "excel")


class DatasetSplit(Enum):
    """Which folder of a class to read."""

    TRAIN = "train"
    TEST = "test"


def _is_image(name: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def _list_images(folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[str]:
    """Sorted paths of the image files directly in ``folder``."""
    return [
        os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if _is_image(name, extensions) and os.path.isfile(os.path.join(folder, name))
    ]


def _subfolders(folder: str) -> List[str]:
    return sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))


def load_image(path: str, mode: Optional[str] = "RGB") -> PIL.Image.Image:
    """Open and decode an image (converted to ``mode`` unless None); GlassError if it cannot be read."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode is not None else image.copy()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise GlassError(f"cannot read image {path} ({exc}): replace or remove the file") from None


def list_textures(anomaly_source_path: str) -> List[str]:
    """Sorted ``<anomaly_source_path>/*/*.jpg`` (also .jpeg/.png); GlassError when there are none."""
    if not os.path.isdir(anomaly_source_path):
        raise GlassError(
            f"texture folder {anomaly_source_path} does not exist: pass the DTD 'images' folder "
            "(one subfolder of .jpg files per texture)"
        )
    paths = []
    for category in _subfolders(anomaly_source_path):
        paths.extend(_list_images(os.path.join(anomaly_source_path, category), TEXTURE_EXTENSIONS))
    if not paths:
        raise GlassError(
            f"texture folder {anomaly_source_path} holds no images as <category>/*.jpg: pass the DTD "
            "'images' folder (one subfolder of .jpg files per texture)"
        )
    return sorted(paths)


def find_masks(image_paths: Sequence[str], mask_folder: str, anomaly: str) -> List[str]:
    """The ground-truth mask of each defect image, matched by file stem.

    ``<stem>_mask.png`` is preferred, then ``<stem>_mask.<any>``, ``<stem>.png`` and
    ``<stem>.<any>``. Raises GlassError when the folder or a mask is missing.
    """
    if not os.path.isdir(mask_folder):
        raise GlassError(
            f"test images of type '{anomaly}' have no ground-truth folder {mask_folder}: add their masks "
            "as ground_truth/<type>/<name>_mask.png"
        )
    by_stem: Dict[str, List[str]] = {}
    for name in sorted(os.listdir(mask_folder)):
        if _is_image(name):
            by_stem.setdefault(os.path.splitext(name)[0], []).append(name)

    def best(stem: str) -> Optional[str]:
        names = by_stem.get(stem, [])
        pngs = [n for n in names if n.lower().endswith(".png")]
        return (pngs or names or [None])[0]

    masks, missing = [], []
    for image_path in image_paths:
        stem = os.path.splitext(os.path.basename(image_path))[0]
        name = best(stem + "_mask") or best(stem)
        if name is None:
            missing.append(os.path.basename(image_path))
        else:
            masks.append(os.path.join(mask_folder, name))
    if missing:
        raise GlassError(
            f"{len(missing)} test image(s) of type '{anomaly}' have no mask in {mask_folder} "
            f"(first: {missing[0]}): add <name>_mask.png for each"
        )
    return masks


class MVTecDataset(torch.utils.data.Dataset):
    """MVTec AD, MPDD or WFDD class folder as GLASS training or test items.

    Train items: ``image`` (3, S, S), ``aug`` the image with a Perlin-shaped texture blended in,
    ``mask_s`` (S/downsampling, S/downsampling) where it was blended, ``mask_gt`` zeros, ``beta``.
    Test items: ``image``, binary ``mask_gt`` (1, S, S) (zeros for good images), ``aug`` and
    ``mask_s`` as ``torch.tensor([1])``. Both carry ``is_anomaly``, ``anomaly`` and ``image_path``.
    """

    def __init__(
        self,
        source: str,
        anomaly_source_path: str,
        dataset_name: str = "mvtec",
        classname: str = "leather",
        resize: int = 288,
        imagesize: int = 288,
        split: DatasetSplit = DatasetSplit.TRAIN,
        rotate_degrees: float = 0,
        translate: float = 0,
        brightness_factor: float = 0,
        contrast_factor: float = 0,
        saturation_factor: float = 0,
        gray_p: float = 0,
        h_flip_p: float = 0,
        v_flip_p: float = 0,
        distribution: int = 0,
        mean: float = 0.5,
        std: float = 0.1,
        fg: int = 0,
        rand_aug: int = 1,
        scale: float = 0,
        batch_size: int = 8,
        downsampling: int = 8,
        excel_dir: Union[str, Sequence[str], None] = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            source: folder holding the class folders.
            anomaly_source_path: texture folder (DTD ``images``), ``<category>/*.jpg``.
            dataset_name: ``mvtec``, ``mpdd`` or ``wfdd``; names the xlsx and its ``Class`` keys.
            classname: class folder to read.
            resize: shorter side after resizing (a square side with ``distribution == 1``).
            imagesize: side of the centre crop.
            split: ``DatasetSplit.TRAIN`` or ``DatasetSplit.TEST``.
            rotate_degrees, translate, scale, brightness_factor, contrast_factor, saturation_factor,
                gray_p, h_flip_p, v_flip_p: optional augmentation of the images.
            distribution: the ``--distribution`` mode (1 = judge: square resize, no enlargement).
            mean, std: blend weight ``beta ~ N(mean, std)`` clipped to [0.2, 0.8].
            fg: foreground masks: 0 none, 1 from ``<source>/fg_mask/<class>/``, 2 as the xlsx says.
            rand_aug: 1 applies three random transforms to each texture.
            batch_size: kept for the trainer.
            downsampling: image size / feature grid size; ``mask_s`` has side imagesize // downsampling.
            excel_dir: folder(s) with ``<dataset_name>_distribution.xlsx`` for ``fg == 2``; the
                shipped ``datasets/excel`` is consulted after them.
        """
        super().__init__()
        self.source = str(source)
        self.anomaly_source_path = str(anomaly_source_path)
        self.dataset_name = dataset_name
        self.classname = classname
        self.split = split
        self.batch_size = batch_size
        self.distribution = distribution
        self.mean = mean
        self.std = std
        self.fg = fg
        self.rand_aug = rand_aug
        self.downsampling = downsampling
        self.imgsize = imagesize
        self.imagesize = (3, self.imgsize, self.imgsize)
        self.resize: Union[int, List[int]] = resize if distribution != 1 else [resize, resize]
        if distribution != 1 and classname in ENLARGED_CLASSES:
            self.resize = round(self.imgsize * 329 / 288)

        self.data_to_iterate = self._collect_items()
        self.anomaly_source_paths: List[str] = []
        self.class_fg = 0
        if split == DatasetSplit.TRAIN:
            self.anomaly_source_paths = list_textures(self.anomaly_source_path)
            self.class_fg = self._foreground_flag(excel_dir)
            if self.class_fg:
                self._check_fg_masks()

        self.transform_img = transforms.Compose([
            transforms.Resize(self.resize),
            transforms.ColorJitter(brightness_factor, contrast_factor, saturation_factor),
            transforms.RandomHorizontalFlip(h_flip_p),
            transforms.RandomVerticalFlip(v_flip_p),
            transforms.RandomGrayscale(gray_p),
            transforms.RandomAffine(
                rotate_degrees,
                translate=(translate, translate),
                scale=(1.0 - scale, 1.0 + scale),
                interpolation=transforms.InterpolationMode.BILINEAR,
            ),
            transforms.CenterCrop(self.imgsize),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ])
        self.transform_mask = transforms.Compose([
            transforms.Resize(self.resize),
            transforms.CenterCrop(self.imgsize),
            transforms.ToTensor(),
        ])
        LOGGER.info(
            "%s_%s %s: %d images%s", dataset_name, classname, split.value, len(self.data_to_iterate),
            f", {len(self.anomaly_source_paths)} textures, fg {self.class_fg}" if split == DatasetSplit.TRAIN else "",
        )

    # ------------------------------------------------------------------------------------------
    # Files

    def _collect_items(self) -> List[list]:
        """[classname, anomaly, image_path, mask_path or None] for every image of the split."""
        if not os.path.isdir(self.source):
            raise GlassError(f"data path {self.source} does not exist: pass the folder that holds the class folders")
        class_dir = os.path.join(self.source, self.classname)
        if not os.path.isdir(class_dir):
            found = [d for d in _subfolders(self.source) if d != "fg_mask"]
            raise GlassError(
                f"class '{self.classname}' not found in {self.source}: available classes are "
                f"{', '.join(found) if found else '(none)'}"
            )
        split_dir = os.path.join(class_dir, self.split.value)
        if not os.path.isdir(split_dir):
            raise GlassError(f"{split_dir} is missing: a class folder needs train/good and test/<type> folders")
        if self.split == DatasetSplit.TRAIN:
            good_dir = os.path.join(split_dir, "good")
            if not os.path.isdir(good_dir) or not _list_images(good_dir):
                raise GlassError(f"no training images in {good_dir}: put the defect-free images there")

        items = []
        for anomaly in _subfolders(split_dir):
            image_paths = _list_images(os.path.join(split_dir, anomaly))
            if self.split == DatasetSplit.TEST and anomaly != "good":
                mask_paths: List[Optional[str]] = list(self._masks_for(anomaly, image_paths))
            else:
                mask_paths = [None] * len(image_paths)
            items.extend([self.classname, anomaly, p, m] for p, m in zip(image_paths, mask_paths))
        if not items:
            raise GlassError(f"no images in {split_dir}/<type>/: expected MVTec layout")
        return items

    def _masks_for(self, anomaly: str, image_paths: Sequence[str]) -> List[str]:
        """Mask paths of one defect type (the one place that decides what a missing mask means)."""
        if not image_paths:
            return []
        gt_dir = os.path.join(self.source, self.classname, "ground_truth")
        if not os.path.isdir(gt_dir):
            raise GlassError(
                f"{gt_dir} is missing: test defect images need masks as ground_truth/<type>/<name>_mask.png"
            )
        return find_masks(image_paths, os.path.join(gt_dir, anomaly), anomaly)

    def _foreground_flag(self, excel_dir: Union[str, Sequence[str], None]) -> int:
        """Whether training items use foreground masks (``fg`` 0/1, or the xlsx entry for 2)."""
        if self.fg != 2:
            return int(self.fg == 1)
        dirs = [excel_dir] if isinstance(excel_dir, (str, os.PathLike)) else list(excel_dir or [])
        dirs = [str(d) for d in dirs] + [SHIPPED_EXCEL_DIR]
        key = f"{self.dataset_name}_{self.classname}"
        try:
            found = utils.lookup_distribution(dirs, self.dataset_name, key)
        except Exception as exc:  # the reference falls back to foreground masks on any failure
            LOGGER.warning("Could not look up the foreground flag of %s (%s); using fg masks", key, exc)
            found = None
        if found is None:
            LOGGER.info("%s is not in any %s_distribution.xlsx: using fg masks", key, self.dataset_name)
            return 1
        return int(found[1])

    def fg_mask_path(self, image_path: str) -> str:
        """``<source>/fg_mask/<class>/<image file name>``."""
        return os.path.join(self.source, "fg_mask", self.classname, os.path.basename(image_path))

    def _check_fg_masks(self) -> None:
        missing = [p for _, _, p, _ in self.data_to_iterate if not os.path.isfile(self.fg_mask_path(p))]
        if missing:
            raise GlassError(
                f"{len(missing)} training image(s) have no foreground mask (first: {self.fg_mask_path(missing[0])}): "
                "create them or use --fg 0"
            )

    # ------------------------------------------------------------------------------------------
    # Items

    def rand_augmenter(self) -> transforms.Compose:
        """Texture transform with three distinct random augmentations between resize and crop."""
        candidates = [
            transforms.ColorJitter(contrast=(0.8, 1.2)),
            transforms.ColorJitter(brightness=(0.8, 1.2)),
            transforms.ColorJitter(saturation=(0.8, 1.2), hue=(-0.2, 0.2)),
            transforms.RandomHorizontalFlip(p=1),
            transforms.RandomVerticalFlip(p=1),
            transforms.RandomGrayscale(p=1),
            transforms.RandomAutocontrast(p=1),
            transforms.RandomEqualize(p=1),
            transforms.RandomAffine(degrees=(-45, 45)),
        ]
        chosen = np.random.choice(np.arange(len(candidates)), 3, replace=False)
        return transforms.Compose([
            transforms.Resize(self.resize),
            *(candidates[i] for i in chosen),
            transforms.CenterCrop(self.imgsize),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ])

    def _foreground(self, image_path: str) -> torch.Tensor:
        """Foreground mask (S, S) of 0/1, or ``torch.tensor([1])`` when foreground masks are off."""
        if not self.class_fg:
            return torch.tensor([1])
        path = self.fg_mask_path(image_path)
        if not os.path.isfile(path):
            raise GlassError(f"foreground mask {path} is missing: create it or use --fg 0")
        mask_fg = torch.ceil(self.transform_mask(load_image(path, mode=None))[0])
        if float(mask_fg.max()) <= 0:
            raise GlassError(f"foreground mask {path} is empty after resizing and cropping: fix it or use --fg 0")
        return mask_fg

    def make_train_item(self, idx: int) -> Dict[str, Any]:
        """A training item with its intermediate pieces (``texture``, ``mask_l``, ``mask_fg``).

        The random draws follow the reference's order: image transform (torch), texture file and
        augmentation choice (NumPy), texture transform (torch), Perlin mask, beta (NumPy).
        """
        classname, anomaly, image_path, _ = self.data_to_iterate[idx]
        image = self.transform_img(load_image(image_path))

        texture_path = self.anomaly_source_paths[np.random.choice(len(self.anomaly_source_paths))]
        transform_tex = self.rand_augmenter() if self.rand_aug else self.transform_img
        texture = transform_tex(load_image(texture_path))

        mask_fg = self._foreground(image_path)
        try:
            mask_s, mask_l = perlin_mask(image.shape, self.imgsize // self.downsampling, 0, 6, mask_fg, 1)
        except ValueError as exc:
            raise GlassError(f"cannot place an anomaly in {image_path}: {exc}; fix its fg mask or use --fg 0") from None
        mask_s = torch.from_numpy(mask_s)
        mask_l = torch.from_numpy(mask_l)

        beta = float(np.clip(np.random.normal(loc=self.mean, scale=self.std), 0.2, 0.8))
        aug = image * (1 - mask_l) + (1 - beta) * texture * mask_l + beta * image * mask_l
        return {
            "image": image,
            "aug": aug.float(),
            "mask_s": mask_s,
            "mask_gt": torch.zeros([1, *image.shape[1:]]),
            "is_anomaly": int(anomaly != "good"),
            "anomaly": anomaly,
            "image_path": image_path,
            "beta": beta,
            "texture": texture,
            "texture_path": texture_path,
            "mask_l": mask_l,
            "mask_fg": mask_fg,
        }

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        if self.split == DatasetSplit.TRAIN:
            item = self.make_train_item(idx)
            return {key: item[key] for key in
                    ("image", "aug", "mask_s", "mask_gt", "is_anomaly", "anomaly", "image_path", "beta")}

        _, anomaly, image_path, mask_path = self.data_to_iterate[idx]
        image = self.transform_img(load_image(image_path))
        if mask_path is not None:
            # Kept as resized (edges fractional), as the reference: the metrics decide what counts.
            mask_gt = self.transform_mask(load_image(mask_path, mode="L"))
        else:
            mask_gt = torch.zeros([1, *image.shape[1:]])
        return {
            "image": image,
            "aug": torch.tensor([1]),
            "mask_s": torch.tensor([1]),
            "mask_gt": mask_gt,
            "is_anomaly": int(anomaly != "good"),
            "anomaly": anomaly,
            "image_path": image_path,
        }

    def __len__(self) -> int:
        return len(self.data_to_iterate)

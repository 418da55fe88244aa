"""What every loader shares: splits, image files, the layout check and GLASS's training and test items.

A loader subclasses :class:`AnomalyDataset` and says only where a class's files are
(``_collect_items``); this module turns its rows into items. Training items carry a synthesised local
anomaly (LAS: a Perlin-shaped DTD texture blended into the image); test items carry their ground truth.

A row is ``[classname, anomaly, image_path, mask]``. ``anomaly`` is the defect type, or the loader's
``NORMAL`` name for a defect-free image. ``mask`` is a mask file, a tuple of mask files whose union is
the mask (MVTec LOCO), or None. Mask files count every non-zero pixel as defective.

Ground truth of a test image:
  * a normal image: an all-zero mask;
  * a defect image with a mask: the mask, resized and cropped like the image;
  * a defect image without a mask: unknown. Its ``mask_gt`` is filled with NaN and the evaluation leaves
    the image out of the pixel metrics (the image metrics use every image). Pixel metrics are thus
    computed on the images whose ground truth is known; when no defect image has a mask they are not
    available (NaN, printed ``n/a``, an empty cell in results.csv). The loader logs which case applies.

The layout check runs before training: every problem of a class folder (missing or empty folders,
unreadable images and masks, masks of another size than their image, masks named unlike any image,
missing foreground masks, a test split without normal or without defect images) is collected and
reported in one :class:`~utils.GlassError`. It reads image headers only.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from torchvision import transforms

import utils
from perlin import perlin_mask
from utils import IMAGENET_MEAN, IMAGENET_STD, GlassError

LOGGER = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TEXTURE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The xlsx shipped with the project, consulted after the ones passed in (the reference reads it).
SHIPPED_EXCEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "excel")
# How many file names one kind of problem lists before "...".
EXAMPLES_PER_PROBLEM = 3

Mask = Union[None, str, Tuple[str, ...]]


class DatasetSplit(Enum):
    """Which part of a class to read."""

    TRAIN = "train"
    TEST = "test"


# --------------------------------------------------------------------------------------------------
# Files

def is_image(name: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    """Whether ``name`` has an image extension (any case) and is not hidden (macOS's ``._*`` files are not images)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions


def decode_all(function: Callable[[str], Any], paths: Sequence[str]) -> List[Any]:
    """``function`` of every path, in order, on a few threads (decoding and resizing release the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, utils.usable_cores())) as pool:
        return list(pool.map(function, paths))


def list_images(folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, broken_links: bool = False) -> List[str]:
    """Sorted paths of the image files directly in ``folder`` (none if it does not exist); with ``broken_links``, links
    named as images that point nowhere too (for the layout check to name them)."""
    if not os.path.isdir(folder):
        return []
    return [
        path for path in (os.path.join(folder, name) for name in sorted(os.listdir(folder)) if is_image(name, extensions))
        if os.path.isfile(path) or (broken_links and is_broken_link(path))
    ]


def other_files(folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[str]:
    """Sorted paths of the files directly in ``folder`` that :func:`list_images` leaves out (hidden ones aside)."""
    if not os.path.isdir(folder):
        return []
    return [path for path in (os.path.join(folder, name) for name in sorted(os.listdir(folder))
                              if not name.startswith(".") and not is_image(name, extensions))
            if os.path.isfile(path)]


def is_broken_link(path: str) -> bool:
    """Whether ``path`` is a symbolic link to nothing."""
    return os.path.islink(path) and not os.path.exists(path)


def missing_file_problem(kind: str, path: str, unreadable_hint: str = "replace or remove them") -> Tuple[str, str]:
    """(kind of problem, hint) for an image or mask file (``kind``) that cannot be read: a broken link, missing, or
    unreadable."""
    if is_broken_link(path):
        return f"{kind} that is a broken link", f"the link points to {os.readlink(path)}, which does not exist: fix or remove it"
    if not os.path.isfile(path):
        return f"missing {kind}", ""
    if over_pixel_limit(path):
        return (f"{kind} over Pillow's pixel limit", f"Pillow refuses images of more than {2 * PIL.Image.MAX_IMAGE_PIXELS} "
                "pixels as possible decompression bombs: downscale them")
    return f"unreadable {kind}", unreadable_hint


def over_pixel_limit(path: str) -> bool:
    """Whether Pillow refuses to open the image at ``path`` for its size (``PIL.Image.DecompressionBombError``)."""
    try:
        with PIL.Image.open(path):
            return False
    except PIL.Image.DecompressionBombError:
        return True
    except Exception:  # unreadable for another reason
        return False


def subfolders(folder: str) -> List[str]:
    """Sorted names of the folders directly in ``folder``, hidden ones left out."""
    return sorted(name for name in os.listdir(folder)
                  if not name.startswith(".") and os.path.isdir(os.path.join(folder, name)))


# Pillow modes of more than 8 bits per pixel and channel: converting them to RGB clips every value above 255.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def distribution_table_dirs(excel_dir: Union[str, os.PathLike, Sequence[str], None]) -> List[str]:
    """The folders searched for ``<dataset>_distribution.xlsx``, in order: the run's, then the shipped tables."""
    dirs = [excel_dir] if isinstance(excel_dir, (str, os.PathLike)) else list(excel_dir or [])
    return [str(d) for d in dirs] + [SHIPPED_EXCEL_DIR]


def image_header(path: str) -> Optional[Tuple[Tuple[int, int], str]]:
    """((width, height), Pillow mode) from the file's header, or None when it is not a readable image."""
    try:
        with PIL.Image.open(path) as image:
            return image.size, image.mode
    except Exception:  # any failure to parse the header means "unreadable"
        return None


def warn_wide_images(paths: Sequence[str], what: str = "image(s)") -> None:
    """Warn, naming them, that these images have more than 8 bits per pixel (:data:`WIDE_MODES`)."""
    if paths:
        LOGGER.warning(
            "%d %s of more than 8 bits per pixel (%s%s): read as the reference reads images, converted to 8-bit RGB "
            "with every value above 255 clipped (16-bit images turn mostly white, 0..1 float ones black); convert "
            "them to 8 bits first", len(paths), what,
            ", ".join(paths[:EXAMPLES_PER_PROBLEM]), ", ..." if len(paths) > EXAMPLES_PER_PROBLEM else "",
        )


# An image that Resize would make larger than this (about 200 MB as 8-bit RGB) is refused: only an extreme
# aspect ratio gets there (Pillow overflows, or memory runs out, resizing it).
MAX_RESIZED_PIXELS = 2 ** 26


def resized_pixels(size: Tuple[int, int], resize: Union[int, Sequence[int]]) -> int:
    """Pixels of an image of ``size`` (width, height) after torchvision's ``Resize(resize)``: one number sets the
    shorter side (the longer one scaled alike), two set (height, width)."""
    if not isinstance(resize, int) and len(resize) > 1:
        return int(resize[0]) * int(resize[1])
    side = resize if isinstance(resize, int) else resize[0]
    short, long = sorted(size)
    return int(side) * int(int(side) * long / short)


def elongation_problem(path: str, size: Tuple[int, int], resize: Union[int, Sequence[int]]) -> Optional[str]:
    """Why the image at ``path`` of ``size`` cannot be resized by ``Resize(resize)`` (None when it can)."""
    pixels = resized_pixels(size, resize)
    if pixels <= MAX_RESIZED_PIXELS:
        return None
    return (f"image {path} is {size[0]}x{size[1]} pixels: resized to {resize} on its shorter side it would take "
            f"{pixels / 1e6:.0f} million pixels; crop it to a less elongated image")


def image_size(path: str) -> Optional[Tuple[int, int]]:
    """(width, height) from the file's header, or None when it is not a readable image."""
    header = image_header(path)
    return None if header is None else header[0]


class UnreadableImageError(GlassError):
    """An image or mask that cannot be decoded (its header passed the layout check: a truncated file, say)."""


def load_image(path: str, mode: Optional[str] = "RGB") -> PIL.Image.Image:
    """Open and decode an image (converted to ``mode`` unless None); UnreadableImageError if it cannot be read."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode is not None else image.copy()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise UnreadableImageError(f"cannot read image {path} ({exc}): replace or remove the file") from None


def image_bytes(image: PIL.Image.Image) -> int:
    """Memory the pixels of a decoded image take (8-bit bands)."""
    return image.width * image.height * len(image.getbands())


def mask_pixels(path: str) -> np.ndarray:
    """Boolean defect map of a mask file: every non-zero pixel (palette masks: non-zero index)."""
    image = load_image(path, mode=None)
    if image.mode not in ("1", "L", "P", *WIDE_MODES):  # these as they are: a converted faint value could become 0
        image = image.convert("L")
    return np.asarray(image) > 0


def load_mask(mask: Union[str, Sequence[str]]) -> PIL.Image.Image:
    """The union of one or more mask files as a 0/255 grey image (non-zero = defect)."""
    paths = [mask] if isinstance(mask, str) else list(mask)
    union = mask_pixels(paths[0])
    for path in paths[1:]:
        pixels = mask_pixels(path)
        if pixels.shape != union.shape:
            raise GlassError(f"mask {path} has another size than {paths[0]}: the masks of one image must have its size")
        union |= pixels
    return PIL.Image.fromarray(union.astype(np.uint8) * 255, mode="L")


def list_textures(anomaly_source_path: str) -> List[str]:
    """Sorted ``<anomaly_source_path>/*/*.jpg`` (also .jpeg/.png); GlassError when there are none."""
    if not os.path.isdir(anomaly_source_path):
        raise GlassError(
            f"texture folder {anomaly_source_path} does not exist: pass the DTD 'images' folder "
            "(one subfolder of .jpg files per texture)"
        )
    paths = []
    for category in subfolders(anomaly_source_path):
        paths.extend(list_images(os.path.join(anomaly_source_path, category), TEXTURE_EXTENSIONS))
    if not paths:
        raise GlassError(
            f"texture folder {anomaly_source_path} holds no images as <category>/<image> "
            f"({', '.join(TEXTURE_EXTENSIONS)}): pass the DTD 'images' folder (one subfolder of .jpg files per texture)"
        )
    return sorted(paths)


# --------------------------------------------------------------------------------------------------
# Layout problems

class LayoutProblems:
    """The problems found in one class of a dataset, grouped by kind and reported together."""

    def __init__(self, root: str, classname: str, layout: str = "dataset") -> None:
        self.root = root
        self.classname = classname
        self.layout = layout  # the layout's name, e.g. "MVTec AD"
        self.groups: Dict[str, Dict[str, Any]] = {}

    def add(self, what: str, item: str, plural: Optional[str] = None, hint: str = "") -> None:
        """Record one problem: ``what`` names its kind (singular), ``item`` the file or folder."""
        group = self.groups.setdefault(what, {"plural": plural or what + "s", "hint": hint, "items": []})
        if item not in group["items"]:
            group["items"].append(item)

    def merge(self, other: "LayoutProblems") -> None:
        """Add every problem of ``other`` to these."""
        for what, group in other.groups.items():
            for item in group["items"]:
                self.add(what, item, group["plural"], group["hint"])

    def __bool__(self) -> bool:
        return bool(self.groups)

    def describe(self) -> str:
        """One line: ``<n> <kind> (<examples>[; hint]); ...``."""
        parts = []
        for what, group in self.groups.items():
            items = group["items"]
            shown = ", ".join(items[:EXAMPLES_PER_PROBLEM]) + (", ..." if len(items) > EXAMPLES_PER_PROBLEM else "")
            hint = f"; {group['hint']}" if group["hint"] else ""
            parts.append(f"{len(items)} {what if len(items) == 1 else group['plural']} ({shown}{hint})")
        return f"{self.layout} layout problems in {self.root} (class {self.classname}): " + "; ".join(parts)


def raise_layout_problems(datasets: Iterable[Optional["AnomalyDataset"]]) -> None:
    """One GlassError for every layout problem of the given datasets (merged per class); nothing if none."""
    merged: Dict[Tuple[str, str, str], LayoutProblems] = {}
    for data in datasets:
        if data is None or not data.layout_problems:
            continue
        problems = data.layout_problems
        key = (problems.root, problems.classname, problems.layout)
        merged.setdefault(key, LayoutProblems(*key)).merge(problems)
    if merged:
        raise GlassError(" | ".join(p.describe() for p in merged.values()) + ": fix them and run again")


# --------------------------------------------------------------------------------------------------

class AnomalyDataset(torch.utils.data.Dataset):
    """One class of an anomaly-detection dataset as GLASS training or test items.

    Train items: ``image`` (3, S, S), ``aug`` the image with a Perlin-shaped texture blended in,
    ``mask_s`` (S/downsampling, S/downsampling) where it was blended, ``mask_gt`` zeros, ``beta``.
    Test items: ``image``, ``mask_gt`` (1, S, S) (zeros for normal images, NaN where unknown), ``aug``
    and ``mask_s`` as ``torch.tensor([1])``. Both carry ``is_anomaly``, ``anomaly`` and ``image_path``.
    Subclasses implement ``_collect_items``.
    """

    # The ``anomaly`` name of defect-free images.
    NORMAL = "good"
    # Classes whose images are resized by 329/288 before the centre crop (unless distribution == 1).
    ENLARGED_CLASSES: Tuple[str, ...] = ()
    # The reference binarises VisA masks after resizing (> 0); MVTec masks keep their resized values.
    BINARIZE_RESIZED_MASK = False
    # Name of the layout, for the layout check's messages.
    LAYOUT = "dataset"

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
        downsampling: int = 8,
        excel_dir: Union[str, Sequence[str], None] = None,
        check_layout: bool = True,
    ) -> None:
        """
        Args:
            source: the dataset's root folder (holding the class folders).
            anomaly_source_path: texture folder (DTD ``images``), ``<category>/*.jpg``.
            dataset_name: the CLI's dataset name; names the xlsx and its ``Class`` keys.
            classname: class to read.
            resize: shorter side after resizing (a square side with ``distribution == 1``).
            imagesize: side of the centre crop.
            split: ``DatasetSplit.TRAIN`` or ``DatasetSplit.TEST``.
            rotate_degrees, translate, scale, brightness_factor, contrast_factor, saturation_factor,
                gray_p, h_flip_p, v_flip_p: optional augmentation of the images.
            distribution: the ``--distribution`` mode (1 = judge: square resize, no enlargement).
            mean, std: blend weight ``beta ~ N(mean, std)`` clipped to [0.2, 0.8].
            fg: foreground masks: 0 none, 1 from ``<source>/fg_mask/<class>/``, 2 as the xlsx says.
            rand_aug: 1 applies three random transforms to each texture.
            downsampling: image size / feature grid size; ``mask_s`` has side imagesize // downsampling.
            excel_dir: folder(s) with ``<dataset_name>_distribution.xlsx`` for ``fg == 2``; the
                shipped ``datasets/excel`` is consulted after them.
            check_layout: raise the layout problems at once (GlassError). With False they are kept in
                ``layout_problems`` for :func:`raise_layout_problems`, which reports several splits together.
        """
        super().__init__()
        self.source = str(source)
        self.anomaly_source_path = str(anomaly_source_path)
        self.dataset_name = dataset_name
        self.classname = classname
        self.split = split
        self.distribution = distribution
        self.mean = mean
        self.std = std
        self.fg = fg
        self.rand_aug = rand_aug
        self.downsampling = downsampling
        self.imgsize = imagesize
        self.imagesize = (3, self.imgsize, self.imgsize)
        self.resize: Union[int, List[int]] = resize if distribution != 1 else [resize, resize]
        if distribution != 1 and classname in self.ENLARGED_CLASSES:
            self.resize = round(self.imgsize * 329 / 288)
        self.judge_resize = [resize, resize]  # how ``--distribution 1`` resizes: square, never enlarged

        if not os.path.isdir(self.source):
            raise GlassError(f"data path {self.source} does not exist: pass the folder that holds the class folders")
        self.layout_problems = LayoutProblems(self.source, classname, self.LAYOUT)
        self.unknown_masks = 0  # defect test images without a mask
        self.data_to_iterate: List[list] = self._collect_items()
        self.anomaly_source_paths: List[str] = []
        self.class_fg = 0
        self.foreground_pending = False  # fg 2 for a class the trainer judges: see settle_foreground
        if split == DatasetSplit.TRAIN:
            self.class_fg = self._foreground_flag(excel_dir)
        self._check_files()
        if split == DatasetSplit.TEST:
            self._check_test_labels()
            self._log_ground_truth()
        if check_layout:
            raise_layout_problems([self])
        if split == DatasetSplit.TRAIN:
            self.anomaly_source_paths = list_textures(self.anomaly_source_path)

        # Train-time image augmentation (all 0 by default): with none, an image's tensor is the same every
        # epoch, which lets the trainer cache its backbone features (common.py, "Feature cache").
        self.augmentation = {
            "rotate_degrees": rotate_degrees, "translate": translate, "scale": scale, "brightness": brightness_factor,
            "contrast": contrast_factor, "saturation": saturation_factor, "gray": gray_p, "hflip": h_flip_p,
            "vflip": v_flip_p,
        }
        self.transform_img = self.image_transform(self.resize)
        self.resized_images: Optional[List[PIL.Image.Image]] = None  # see preload_images
        self.foreground_masks: Optional[List[torch.Tensor]] = None  # likewise, with foreground masks
        self._after_resize: Optional[Callable[[PIL.Image.Image], torch.Tensor]] = None  # the transform after Resize
        self.resized_textures: Dict[str, PIL.Image.Image] = {}  # see preload_textures
        self._texture_augmentations: Optional[List[Callable]] = None  # built at the first rand_augmenter call
        self.transform_mask = transforms.Compose([
            transforms.Resize(self.resize),
            transforms.CenterCrop(self.imgsize),
            transforms.ToTensor(),
        ])
        LOGGER.info(
            "%s_%s %s: %d images%s", dataset_name, classname, split.value, len(self.data_to_iterate),
            f", {len(self.anomaly_source_paths)} textures, fg {'as judged' if self.foreground_pending else self.class_fg}"
            if split == DatasetSplit.TRAIN else "",
        )

    def image_transform(self, resize: Union[int, List[int]]) -> transforms.Compose:
        """The image transform: Resize(``resize``), the train-time augmentations, CenterCrop, ToTensor,
        ImageNet normalisation."""
        augmentation = self.augmentation
        return transforms.Compose([
            transforms.Resize(resize),
            transforms.ColorJitter(augmentation["brightness"], augmentation["contrast"], augmentation["saturation"]),
            transforms.RandomHorizontalFlip(augmentation["hflip"]),
            transforms.RandomVerticalFlip(augmentation["vflip"]),
            transforms.RandomGrayscale(augmentation["gray"]),
            transforms.RandomAffine(
                augmentation["rotate_degrees"],
                translate=(augmentation["translate"], augmentation["translate"]),
                scale=(1.0 - augmentation["scale"], 1.0 + augmentation["scale"]),
                interpolation=transforms.InterpolationMode.BILINEAR,
            ),
            transforms.CenterCrop(self.imgsize),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ])

    # ------------------------------------------------------------------------------------------
    # What a loader provides

    def _collect_items(self) -> List[list]:
        """Rows ``[classname, anomaly, image_path, mask]`` of the split; problems go to ``layout_problems``."""
        raise NotImplementedError

    def relative(self, path: str) -> str:
        """``path`` relative to the dataset root, for messages."""
        return os.path.relpath(path, self.source)

    # ------------------------------------------------------------------------------------------
    # Checks (header reads only)

    def _check_files(self) -> None:
        """Every image and mask of the rows (and foreground mask) exists, is readable, masks fit their image."""
        problems = self.layout_problems
        wide: List[str] = []
        for _, _, image_path, mask in self.data_to_iterate:
            header = image_header(image_path)
            size = None if header is None else header[0]
            if header is not None and header[1] in WIDE_MODES:
                wide.append(self.relative(image_path))
            if size is not None and elongation_problem(image_path, size, self.resize):
                problems.add("image too elongated to resize", f"{self.relative(image_path)} {size[0]}x{size[1]}",
                             plural="images too elongated to resize", hint="crop them to less elongated images")
            if size is None:
                what, hint = missing_file_problem("image", image_path)
                problems.add(what, self.relative(image_path), hint=hint)
            for mask_path in ([mask] if isinstance(mask, str) else list(mask or ())):
                mask_size = image_size(mask_path)
                if mask_size is None:
                    what, hint = missing_file_problem("mask", mask_path, unreadable_hint="")
                    problems.add(what, self.relative(mask_path), hint=hint)
                elif size is not None and mask_size != size:
                    problems.add(
                        "mask of another size than its image", f"{self.relative(mask_path)} {mask_size[0]}x"
                        f"{mask_size[1]} vs {size[0]}x{size[1]}", plural="masks of another size than their image",
                    )
        if self.class_fg and self.distribution != 1:  # --distribution 1 only judges the class: no synthesis
            self._check_foreground_masks(problems)
        warn_wide_images(wide, f"{self.dataset_name}_{self.classname} {self.split.value} image(s)")

    def _check_foreground_masks(self, problems: LayoutProblems) -> None:
        """Every training image has a readable foreground mask of its size."""
        for _, _, image_path, _ in self.data_to_iterate:
            fg_path = self.fg_mask_path(image_path)
            fg_size = image_size(fg_path)
            if fg_size is None:
                problems.add("missing or unreadable foreground mask", self.relative(fg_path),
                             plural="missing or unreadable foreground masks",
                             hint="create them (same file names as the training images) or use --fg 0")
                continue
            size = image_size(image_path)
            if size is not None and fg_size != size:
                problems.add(
                    "foreground mask of another size than its image", f"{self.relative(fg_path)} {fg_size[0]}x"
                    f"{fg_size[1]} vs {size[0]}x{size[1]}", plural="foreground masks of another size than their image",
                    hint="they are resized and cropped as their images are, so they must match them")

    def _check_test_labels(self) -> None:
        """Image AUROC needs normal and defect test images."""
        kinds = {row[1] == self.NORMAL for row in self.data_to_iterate}
        if not self.data_to_iterate:
            return  # already reported by the loader
        where = f"{self.classname} test split"
        if True not in kinds:
            self.layout_problems.add("test split without normal images", where,
                                     hint="image AUROC needs normal and defect test images")
        if False not in kinds:
            self.layout_problems.add("test split without defect images", where,
                                     hint="image AUROC needs normal and defect test images")

    def _log_ground_truth(self) -> None:
        """Say how pixel metrics will be computed when some defect images lack a mask."""
        defects = [row for row in self.data_to_iterate if row[1] != self.NORMAL]
        unknown = [row[2] for row in defects if row[3] is None]
        self.unknown_masks = len(unknown)
        name = f"{self.dataset_name}_{self.classname}"
        if not defects or not unknown:
            return
        if len(unknown) == len(defects):
            LOGGER.warning(
                "%s: none of the %d defect test images has a ground-truth mask: pixel metrics (pixel AUROC, AP, "
                "PRO) are not available (n/a); image metrics use all %d test images",
                name, len(defects), len(self.data_to_iterate),
            )
        else:
            shown = ", ".join(self.relative(p) for p in unknown[:EXAMPLES_PER_PROBLEM])
            more = ", ..." if len(unknown) > EXAMPLES_PER_PROBLEM else ""
            LOGGER.warning(
                "%s: %d of %d defect test images have no mask (%s%s): pixel metrics are computed on the %d test "
                "images whose ground truth is known (normal images and defect images with masks); image metrics "
                "use all %d", name, len(unknown), len(defects), shown, more,
                len(self.data_to_iterate) - len(unknown), len(self.data_to_iterate),
            )

    # ------------------------------------------------------------------------------------------
    # Foreground masks

    def _foreground_flag(self, excel_dir: Union[str, Sequence[str], None]) -> int:
        """Whether training items use foreground masks (``fg`` 0/1, or the xlsx entry for 2)."""
        if self.fg != 2:
            return int(self.fg == 1)
        dirs = distribution_table_dirs(excel_dir)
        key = f"{self.dataset_name}_{self.classname}"
        try:
            found = utils.lookup_distribution(dirs, self.dataset_name, key)
        except Exception as exc:  # the reference falls back to foreground masks on any failure
            LOGGER.warning("Could not look up the foreground flag of %s (%s); using fg masks", key, exc)
            found = None
        if found is None and self.distribution in (0, 4):  # the trainer judges the class and records the flag
            LOGGER.info("%s is not in any %s_distribution.xlsx: fg masks as the class is judged", key, self.dataset_name)
            self.foreground_pending = True
            return 0
        if found is None:
            LOGGER.info("%s is not in any %s_distribution.xlsx: using fg masks", key, self.dataset_name)
            return 1
        return int(found[1])

    def settle_foreground(self, flag: int) -> None:
        """Use foreground masks or not (``flag``) for a class whose ``fg 2`` flag waited for the trainer's judgement:
        the Foreground value the judgement records, which a rerun reading the table would use. With masks, they
        must exist (GlassError otherwise)."""
        self.foreground_pending = False
        self.class_fg = int(flag)
        if self.class_fg:
            problems = LayoutProblems(self.source, self.classname, self.LAYOUT)
            self._check_foreground_masks(problems)
            if problems:
                raise GlassError(f"{problems.describe()}: the class was judged as needing them (--fg 2)")
        LOGGER.info("%s_%s: fg %d (as judged)", self.dataset_name, self.classname, self.class_fg)

    def fg_mask_path(self, image_path: str) -> str:
        """``<source>/fg_mask/<class>/<image file name>``."""
        return os.path.join(self.source, "fg_mask", self.classname, os.path.basename(image_path))

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

    # ------------------------------------------------------------------------------------------
    # Items

    def rand_augmenter(self) -> transforms.Compose:
        """Texture transform with three distinct random augmentations between resize and crop."""
        if self._texture_augmentations is None:  # built once: they draw their random numbers when applied
            self._texture_augmentations = [
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
        candidates = self._texture_augmentations
        chosen = np.random.choice(np.arange(len(candidates)), 3, replace=False)
        return transforms.Compose([
            transforms.Resize(self.resize),
            *(candidates[i] for i in chosen),
            transforms.CenterCrop(self.imgsize),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ])

    def _texture_resize(self) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
        """The first step of the texture transform, the same for every texture: Resize (``rand_aug``) or the
        image transform's first step."""
        return transforms.Resize(self.resize) if self.rand_aug else self.transform_img.transforms[0]

    def _load_texture(self, path: str) -> PIL.Image.Image:
        """The decoded texture; UnreadableImageError also when resizing it would take too much memory."""
        picture = load_image(path)
        problem = elongation_problem(path, picture.size, self.resize)
        if problem is not None:
            raise UnreadableImageError(problem)
        return picture

    def _texture(self, path: str, transform: transforms.Compose) -> torch.Tensor:
        """Texture ``path`` through ``transform``: from its kept resized picture after :meth:`preload_textures`."""
        kept = self.resized_textures.get(path)
        try:
            if kept is not None:
                return transforms.Compose(transform.transforms[1:])(kept)
            return transform(self._load_texture(path))
        except UnreadableImageError as exc:  # a shared texture: every class would meet it, so the run stops
            raise GlassError(f"{exc} (a texture of AUG_PATH)") from None

    def make_train_item(self, idx: int) -> Dict[str, Any]:
        """A training item with its intermediate pieces (``texture``, ``mask_l``, ``mask_fg``).

        The random draws follow the reference's order: image transform (torch), texture file and
        augmentation choice (NumPy), texture transform (torch), Perlin mask, beta (NumPy).
        """
        classname, anomaly, image_path, _ = self.data_to_iterate[idx]
        image = self.image(idx)

        texture_path = self.anomaly_source_paths[np.random.choice(len(self.anomaly_source_paths))]
        transform_tex = self.rand_augmenter() if self.rand_aug else self.transform_img
        texture = self._texture(texture_path, transform_tex)

        mask_fg = self._foreground(image_path) if self.foreground_masks is None else \
            self.foreground_masks[idx].to(torch.float32)
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
            "is_anomaly": int(anomaly != self.NORMAL),
            "anomaly": anomaly,
            "image_path": image_path,
            "beta": beta,
            "texture": texture,
            "texture_path": texture_path,
            "mask_l": mask_l,
            "mask_fg": mask_fg,
        }

    def mask_gt(self, anomaly: str, mask: Mask, size: Sequence[int]) -> torch.Tensor:
        """Ground truth (1, H, W): zeros for normal images, NaN where unknown, else the resized mask."""
        if mask is None:
            fill = 0.0 if anomaly == self.NORMAL else float("nan")
            return torch.full([1, *size], fill)
        if self.BINARIZE_RESIZED_MASK:
            # Resized as floats ('F'), then every pixel the defect reaches counts, as the reference's VisA loader:
            # an 8-bit resize would round the faintest edge weights to 0.
            return (self.transform_mask(load_mask(mask).convert("F")) > 0).to(torch.float32)
        # Kept as resized (edges fractional), as the reference: the metrics decide what counts.
        return self.transform_mask(load_mask(mask))

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        if self.split == DatasetSplit.TRAIN:
            item = self.make_train_item(idx)
            item = {key: item[key] for key in
                    ("image", "aug", "mask_s", "mask_gt", "is_anomaly", "anomaly", "image_path", "beta")}
            item["index"] = idx  # cached features are looked up by it
            return item

        _, anomaly, image_path, mask = self.data_to_iterate[idx]
        image = self.image(idx)
        return {
            "image": image,
            "aug": torch.tensor([1]),
            "mask_s": torch.tensor([1]),
            "mask_gt": self.mask_gt(anomaly, mask, image.shape[1:]),
            "is_anomaly": int(anomaly != self.NORMAL),
            "anomaly": anomaly,
            "image_path": image_path,
            "index": idx,
        }

    def __len__(self) -> int:
        return len(self.data_to_iterate)

    def plain_image(self, idx: int, transform: Optional[Callable[[PIL.Image.Image], torch.Tensor]] = None) -> torch.Tensor:
        """Image ``idx`` through the image transform (or ``transform``), as its item has it, without any synthesis."""
        if transform is None:
            return self.image(idx)
        return transform(load_image(self.data_to_iterate[idx][2]))

    def image(self, idx: int) -> torch.Tensor:
        """Image ``idx`` through the image transform: from its kept resized image after :meth:`preload_images`."""
        if self.resized_images is not None:
            return self._after_resize(self.resized_images[idx])
        return self.transform_img(load_image(self.data_to_iterate[idx][2]))

    def preload_images(self, budget_bytes: int) -> int:
        """Decode every image once and keep it as the image transform's first step, Resize, leaves it; items then
        start from the kept image. Resize is deterministic and draws no random number, so items keep their bits
        and the random stream its draws (the later random transforms still draw, even at probability 0), while
        the DataLoader workers no longer decode and resize each image at every epoch. With foreground masks
        (``--fg``), each image's mask is kept too, as it is (0/1 values as bytes). Workers forked afterwards
        share them. Nothing is kept when it would take more than ``budget_bytes``.
        Returns the bytes kept (0: none)."""
        self.resized_images = self.foreground_masks = None  # kept textures stay (preload_textures)
        resize = self.transform_img.transforms[0]
        if not isinstance(resize, transforms.Resize) or not self.data_to_iterate:
            return 0
        first = resize(load_image(self.data_to_iterate[0][2]))
        mask_bytes = self.imgsize ** 2 if self.class_fg else 0  # a byte per pixel of the crop
        if (image_bytes(first) + mask_bytes) * len(self.data_to_iterate) > budget_bytes:
            return 0
        paths = [row[2] for row in self.data_to_iterate]
        images = [first, *decode_all(lambda path: resize(load_image(path)), paths[1:])]  # the first: decoded above
        masks = decode_all(lambda path: self._foreground(path).to(torch.uint8), paths) if self.class_fg else None
        total = sum(image_bytes(image) for image in images) + sum(mask.numel() for mask in masks or [])
        if total > budget_bytes:  # the images differ in size
            return 0
        self.resized_images, self.foreground_masks = images, masks
        self._after_resize = transforms.Compose(self.transform_img.transforms[1:])
        return total

    def release_images(self) -> None:
        """Drop the images (and masks) kept by :meth:`preload_images` and the textures kept by :meth:`preload_textures`."""
        self.resized_images = self.foreground_masks = None
        self.resized_textures = {}

    def preload_textures(self, budget_bytes: int) -> int:
        """Decode every texture once and keep it as the texture transform's first step, Resize, leaves it; the
        textures drawn for the items then start from the kept picture, with the same bits and the same random
        draws (as :meth:`preload_images`). A texture that cannot be read is not kept: the item that draws it
        stops the run as before. Nothing is kept when it would take more than ``budget_bytes``.
        Returns the bytes kept (0: none)."""
        self.resized_textures = {}
        resize = self._texture_resize()
        if not isinstance(resize, transforms.Resize) or not self.anomaly_source_paths:
            return 0

        def resized(path: str) -> Optional[PIL.Image.Image]:
            try:
                return resize(self._load_texture(path))
            except UnreadableImageError:
                return None

        paths = self.anomaly_source_paths
        first = resized(paths[0])
        if first is not None and image_bytes(first) * len(paths) > budget_bytes:  # the estimate; textures differ in size
            return 0
        pictures = [first, *decode_all(resized, paths[1:])]
        kept = {path: picture for path, picture in zip(paths, pictures) if picture is not None}
        total = sum(image_bytes(picture) for picture in kept.values())
        if total > budget_bytes:
            return 0
        self.resized_textures = kept
        return total

    def plain_view(self) -> "PlainImages":
        """The split's images without synthesis (the trainer's centre pass and feature cache)."""
        return PlainImages(self)

    def judge_view(self) -> "PlainImages":
        """The split's images as a ``--distribution 1`` dataset shows them (square resize, no enlargement),
        without synthesis: what the distribution judgement averages, whatever ``--distribution`` asked for."""
        return PlainImages(self, self.image_transform(self.judge_resize))


class PlainImages(torch.utils.data.Dataset):
    """Items ``{"image", "index"}`` of a dataset's images as its items show them (or through ``transform``),
    with no anomaly synthesis.

    The trainer computes the centre from these (in dataset order) and caches their features. Without
    train-time augmentation ``image`` equals the ``image`` of the dataset's item ``index`` exactly.
    """

    def __init__(self, dataset: AnomalyDataset,
                 transform: Optional[Callable[[PIL.Image.Image], torch.Tensor]] = None) -> None:
        self.dataset = dataset
        self.transform = transform  # None: the dataset's image transform

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        return {"image": self.dataset.plain_image(idx, self.transform), "index": idx}

    def __len__(self) -> int:
        return len(self.dataset)

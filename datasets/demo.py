"""Demo data: a small MVTec-AD-layout dataset built offline from scikit-image photographs.

The demo data is **not** MVTec AD. Each class is a real texture photograph that ships inside
scikit-image (``brick``, ``grass``, ``gravel``). Normal images are random crops of that photograph
(with mild flips and brightness changes): training crops come from the top 60 % of the photo, test
crops from the bottom 40 %, so the good test images are unseen. Defective test images are clean test
crops with one synthetic defect painted in:

* ``scratch``: a thin bright or dark polyline;
* ``crack``:   a dark, jagged random-walk line, sometimes branched;
* ``spot``:    a dark or coloured stain, elliptical or irregular;
* ``patch``:   a piece of a different texture photograph pasted in an irregular polygon.

Every defect is drawn as a mask first and only pixels inside the mask are changed, so the ground
truth is exact: the defective image equals its clean crop everywhere outside the mask. Masks are
binary (0/255) PNGs of the same size as their image.

A second folder, ``textures/``, stands in for DTD (the anomaly source GLASS reads through
``aug_path``): ``textures/<category>/*.jpg`` tiles cut from *other* scikit-image pictures
(astronaut, camera, cat, coffee, coins, ...), none of which is used for the classes.

Layout written under ``DEST``::

    DEST/demo/manifest.json
    DEST/demo/<class>/train/good/000.png
    DEST/demo/<class>/test/good/000.png
    DEST/demo/<class>/test/<defect>/000.png
    DEST/demo/<class>/ground_truth/<defect>/000_mask.png
    DEST/textures/<category>/000.jpg

Usage::

    python -m datasets.demo demo_data --classes brick,grass --size 160

The build is deterministic for a given seed (each image has its own random stream, keyed by seed,
class, folder and index) and idempotent: a complete build with the same parameters is left alone.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click
import cv2
import numpy as np
from PIL import Image

import utils

LOGGER = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Class name -> scikit-image loader name (texture photographs).
CLASS_SOURCES: dict[str, str] = {"brick": "brick", "grass": "grass", "gravel": "gravel"}
# Texture category -> scikit-image loader name; disjoint from CLASS_SOURCES.
TEXTURE_SOURCES: dict[str, str] = {
    "astronaut": "astronaut",
    "camera": "camera",
    "cat": "chelsea",
    "coffee": "coffee",
    "coins": "coins",
    "galaxies": "hubble_deep_field",
    "tissue": "immunohistochemistry",
    "moon": "moon",
    "retina": "retina",
    "rocket": "rocket",
}
DEFECT_TYPES: tuple[str, ...] = ("scratch", "crack", "spot", "patch")

DEFAULT_CLASSES: tuple[str, ...] = ("brick", "grass")
DEFAULT_SIZE = 160
DEFAULT_TRAIN = 64
DEFAULT_TEST_GOOD = 16
DEFAULT_TEST_DEFECT = 16
DEFAULT_TEXTURES = 12

TRAIN_FRACTION = 0.6  # rows of the photo reserved for training crops; the rest feed the test crops
MANIFEST_NAME = "manifest.json"


class DemoDataError(Exception):
    """A build that cannot go ahead (bad parameter, unwritable destination)."""


@dataclass(frozen=True)
class SampleSpec:
    """One image of the demo dataset: where it goes and which random stream draws it."""

    class_name: str
    split: str  # "train" or "test"
    label: str  # "good" or a defect type
    index: int  # number inside its folder

    @property
    def is_defect(self) -> bool:
        return self.label != "good"

    @property
    def image_relpath(self) -> str:
        return f"{self.class_name}/{self.split}/{self.label}/{self.index:03d}.png"

    @property
    def mask_relpath(self) -> str | None:
        if not self.is_defect:
            return None
        return f"{self.class_name}/ground_truth/{self.label}/{self.index:03d}_mask.png"


@dataclass
class Sample:
    """A rendered image: ``image`` (H, W, 3) uint8, its ``clean`` crop and a bool ``mask`` or None."""

    spec: SampleSpec
    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray | None


# --------------------------------------------------------------------------- sources


def load_photo(skimage_name: str) -> np.ndarray:
    """Load a bundled scikit-image picture as (H, W, 3) uint8 RGB."""
    import skimage.data

    try:
        image = np.asarray(getattr(skimage.data, skimage_name)())
    except (AttributeError, ModuleNotFoundError, OSError) as exc:
        raise DemoDataError(f"scikit-image picture {skimage_name!r} cannot be loaded offline: {exc}") from exc
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        image = np.clip(image * 255.0 if image.max() <= 1.0 else image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _sample_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A random stream fixed by the seed and the given keys (strings hashed with CRC-32)."""
    words = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(words)


def _parse_size(size: int | Sequence[int] | str) -> tuple[int, int]:
    """``160``, ``(160, 200)`` or ``"160x200"`` -> (height, width)."""
    if isinstance(size, str):
        parts = size.lower().replace(",", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise DemoDataError(f"size must be N or HxW, got {size!r}") from None
    elif isinstance(size, (int, np.integer)):
        values = [int(size)]
    else:
        values = [int(v) for v in size]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 32:
        raise DemoDataError(f"size must be N or HxW with sides >= 32, got {size!r}")
    return values[0], values[1]


def _fit_source(photo: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upscale the photo if the test region (bottom rows) or its width cannot hold a crop of ``size``."""
    height, width = photo.shape[:2]
    test_rows = height - int(round(TRAIN_FRACTION * height))
    scale = max(1.25 * size[0] / test_rows, 1.25 * size[1] / width, 1.0)
    if scale == 1.0:
        return photo
    LOGGER.info("upscaling a %dx%d source photo by %.2f to fit %dx%d crops", height, width, scale, *size)
    new_size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
    return cv2.resize(photo, new_size, interpolation=cv2.INTER_CUBIC)


def _random_crop(photo: np.ndarray, split: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A crop from the split's region with a random flip and a small brightness change."""
    height, width = photo.shape[:2]
    boundary = int(round(TRAIN_FRACTION * height))
    top_lo, top_hi = (0, boundary - size[0]) if split == "train" else (boundary, height - size[0])
    top = int(rng.integers(top_lo, top_hi + 1))
    left = int(rng.integers(0, width - size[1] + 1))
    crop = photo[top : top + size[0], left : left + size[1]].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    gain = rng.uniform(0.93, 1.07)
    offset = rng.uniform(-6.0, 6.0)
    return np.clip(np.rint(crop * gain + offset), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- defects


def _line_thickness(size: tuple[int, int], rng: np.random.Generator, low: float, high: float) -> int:
    scale = min(size) / 160.0
    return max(1, int(round(rng.uniform(low, high) * scale)))


def _scratch_mask(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    height, width = size
    n_points = int(rng.integers(2, 5))
    length = rng.uniform(0.35, 0.8) * min(size)
    step = length / (n_points - 1)
    point = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height])
    angle = rng.uniform(0, 2 * np.pi)
    points = [point.copy()]
    for _ in range(n_points - 1):
        angle += rng.normal(0, 0.35)
        point = point + step * np.array([np.cos(angle), np.sin(angle)])
        points.append(point.copy())
    mask = np.zeros(size, np.uint8)
    pts = np.rint(np.array(points)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(mask, [pts], False, 1, thickness=_line_thickness(size, rng, 1.5, 3.0), lineType=cv2.LINE_8)
    return mask.astype(bool), {"bright": bool(rng.random() < 0.5), "strength": rng.uniform(0.55, 0.85)}


def _crack_mask(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    height, width = size
    mask = np.zeros(size, np.uint8)

    def walk(start: np.ndarray, heading: float, steps: int) -> list[np.ndarray]:
        # Jagged but directional: the deviation from the heading is kicked each step and pulled back.
        points, deviation = [start], 0.0
        for _ in range(steps):
            deviation = 0.6 * deviation + rng.normal(0, 0.55)
            angle = heading + deviation
            segment = rng.uniform(3.0, 7.0) * min(size) / 160.0
            points.append(points[-1] + segment * np.array([np.cos(angle), np.sin(angle)]))
        return points

    start = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height])
    base_angle = rng.uniform(0, 2 * np.pi)
    n_steps = int(rng.integers(10, 18))
    branches = [walk(start, base_angle, n_steps), walk(start, base_angle + np.pi, n_steps // 2)]
    if rng.random() < 0.5:
        fork = branches[0][len(branches[0]) // 2]
        branches.append(walk(fork, base_angle + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2), n_steps // 2))
    thickness = _line_thickness(size, rng, 1.0, 2.5)
    for points in branches:
        pts = np.rint(np.array(points)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(mask, [pts], False, 1, thickness=thickness, lineType=cv2.LINE_8)
    return mask.astype(bool), {"strength": rng.uniform(0.6, 0.85)}


def _blob_mask(size: tuple[int, int], rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """An ellipse, or a union of overlapping ellipses (irregular), of radius ``low..high`` x min(size)."""
    height, width = size
    mask = np.zeros(size, np.uint8)
    center = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height])
    radius = rng.uniform(low, high) * min(size)
    n_parts = 1 if rng.random() < 0.4 else int(rng.integers(3, 7))
    for part in range(n_parts):
        offset = np.zeros(2) if part == 0 else rng.normal(0, 0.45 * radius, size=2)
        scale = 1.0 if part == 0 else rng.uniform(0.4, 0.8)
        axes = (max(1, int(radius * scale)), max(1, int(radius * scale * rng.uniform(0.45, 1.0))))
        c = tuple(int(v) for v in np.rint(center + offset))
        cv2.ellipse(mask, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1, lineType=cv2.LINE_8)
    return mask.astype(bool)


STAIN_COLOURS = np.array([[20, 18, 16], [120, 60, 25], [70, 45, 30], [150, 120, 40], [40, 60, 90]], np.float32)


def _spot_mask(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    mask = _blob_mask(size, rng, 0.06, 0.14)
    colour = STAIN_COLOURS[int(rng.integers(len(STAIN_COLOURS)))]
    return mask, {"colour": colour, "strength": rng.uniform(0.55, 0.85)}


def _patch_mask(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    height, width = size
    center = np.array([rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height])
    radius = rng.uniform(0.1, 0.2) * min(size)
    n_vertices = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n_vertices))
    radii = radius * rng.uniform(0.6, 1.2, n_vertices)
    points = center + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    mask = np.zeros(size, np.uint8)
    cv2.fillPoly(mask, [np.rint(points).astype(np.int32).reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8)
    return mask.astype(bool), {"tone_match": rng.uniform(0.0, 0.7)}


def synthesize_defect(
    clean: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    patch_source: np.ndarray | None = None,
    max_tries: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` into a copy of ``clean``.

    Args:
        clean: (H, W, 3) uint8 image.
        kind: one of DEFECT_TYPES.
        rng: random stream; the result is a pure function of it and the inputs.
        patch_source: (H', W', 3) uint8 photo of another texture (needed for ``patch``), H' >= H, W' >= W.
        max_tries: redraws allowed when a mask comes out too small or mostly unchanged.

    Returns:
        (defective image, bool mask). Pixels outside the mask are exactly those of ``clean``.
    """
    if kind not in DEFECT_TYPES:
        raise DemoDataError(f"unknown defect {kind!r}; choose from {', '.join(DEFECT_TYPES)}")
    size = clean.shape[:2]
    image = clean.astype(np.float32)
    min_area = max(12, int(0.002 * size[0] * size[1]))
    makers = {"scratch": _scratch_mask, "crack": _crack_mask, "spot": _spot_mask, "patch": _patch_mask}
    for _ in range(max_tries):
        mask, params = makers[kind](size, rng)
        if mask.sum() < min_area:
            continue
        if kind == "scratch":
            target = 255.0 if params["bright"] else 0.0
            painted = image + (target - image) * params["strength"]
        elif kind == "crack":
            painted = image * (1.0 - params["strength"])
        elif kind == "spot":
            # Soft interior: the stain is strongest at its centre but still changes every pixel of the mask.
            dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
            alpha = params["strength"] * np.clip(dist / 4.0, 0.5, 1.0)[:, :, None]
            painted = image * (1.0 - alpha) + params["colour"] * alpha
        else:
            if patch_source is None:
                raise DemoDataError("the patch defect needs a patch_source photo")
            top = int(rng.integers(0, patch_source.shape[0] - size[0] + 1))
            left = int(rng.integers(0, patch_source.shape[1] - size[1] + 1))
            piece = patch_source[top : top + size[0], left : left + size[1]].astype(np.float32)
            shift = image[mask].mean(axis=0) - piece[mask].mean(axis=0)
            painted = piece + params["tone_match"] * shift
        painted = np.clip(np.rint(painted), 0, 255).astype(np.uint8)
        result = np.where(mask[:, :, None], painted, clean)
        changed = np.any(result != clean, axis=2)
        if changed[mask].mean() >= 0.5:
            return result, mask
    raise DemoDataError(f"could not draw a visible {kind} defect in {max_tries} tries")


# --------------------------------------------------------------------------- samples


def plan_class(
    class_name: str,
    n_train: int,
    n_test_good: int,
    n_test_defect: int,
    defects: Sequence[str] = DEFECT_TYPES,
) -> list[SampleSpec]:
    """Every image of one class; defect images cycle through ``defects``."""
    specs = [SampleSpec(class_name, "train", "good", i) for i in range(n_train)]
    specs += [SampleSpec(class_name, "test", "good", i) for i in range(n_test_good)]
    counts = dict.fromkeys(defects, 0)
    for i in range(n_test_defect):
        kind = defects[i % len(defects)]
        specs.append(SampleSpec(class_name, "test", kind, counts[kind]))
        counts[kind] += 1
    return specs


def _patch_donor(class_name: str, spec: SampleSpec) -> str:
    """The other texture photo a ``patch`` defect is cut from (deterministic per image)."""
    others = sorted(name for name in CLASS_SOURCES if name != class_name)
    return others[spec.index % len(others)]


def render_sample(
    spec: SampleSpec,
    size: int | Sequence[int] | str = DEFAULT_SIZE,
    seed: int = 0,
    photos: dict[str, np.ndarray] | None = None,
) -> Sample:
    """Draw one image (and, for defects, its clean crop and mask) exactly as the builder writes it.

    ``photos`` caches the source photos (fitted to ``size``) between calls; it is filled as needed.
    """
    hw = _parse_size(size)
    photos = {} if photos is None else photos

    def photo(name: str) -> np.ndarray:
        key = f"{name}@{hw[0]}x{hw[1]}"
        if key not in photos:
            photos[key] = _fit_source(load_photo(CLASS_SOURCES[name]), hw)
        return photos[key]

    rng = _sample_rng(seed, spec.class_name, spec.split, spec.label, spec.index)
    clean = _random_crop(photo(spec.class_name), spec.split, hw, rng)
    if not spec.is_defect:
        return Sample(spec, clean, clean, None)
    donor = photo(_patch_donor(spec.class_name, spec)) if spec.label == "patch" else None
    image, mask = synthesize_defect(clean, spec.label, rng, patch_source=donor)
    return Sample(spec, image, clean, mask)


def _texture_tile(photo: np.ndarray, category: str, index: int, hw: tuple[int, int], seed: int) -> np.ndarray:
    rng = _sample_rng(seed, "textures", category, index)
    height, width = photo.shape[:2]
    side = int(rng.uniform(0.3, 0.8) * min(height, width))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    tile = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    interp = cv2.INTER_AREA if side > min(hw) else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(np.ascontiguousarray(tile), (hw[1], hw[0]), interpolation=interp))


# --------------------------------------------------------------------------- build


def _check_names(names: Sequence[str], known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise DemoDataError(f"no {what} given; choose from {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DemoDataError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise DemoDataError(f"duplicate {what} in {', '.join(names)}")
    return names


def _planned_files(params: dict) -> list[str]:
    """Paths (relative to DEST) that a complete build with ``params`` holds."""
    files = []
    for class_name in params["classes"]:
        for spec in plan_class(
            class_name, params["n_train"], params["n_test_good"], params["n_test_defect"], params["defects"]
        ):
            files.append(f"demo/{spec.image_relpath}")
            if spec.mask_relpath:
                files.append(f"demo/{spec.mask_relpath}")
    for category in params["texture_categories"]:
        files += [f"textures/{category}/{i:03d}.jpg" for i in range(params["n_textures"])]
    return files


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(dest: str | Path, params: dict) -> bool:
    """Whether ``dest`` holds a finished build made with exactly ``params``."""
    dest = Path(dest)
    manifest = _read_manifest(dest / "demo" / MANIFEST_NAME)
    if not manifest or manifest.get("params") != params:
        return False
    return all((dest / rel).is_file() for rel in _planned_files(params))


def _ensure_writable(dest: Path) -> None:
    try:
        utils.make_writable_folder(str(dest))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DemoDataError(f"cannot write to {dest}: {reason}") from None


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def demo_params(
    classes: Sequence[str] = DEFAULT_CLASSES,
    size: int | Sequence[int] | str = DEFAULT_SIZE,
    n_train: int = DEFAULT_TRAIN,
    n_test_good: int = DEFAULT_TEST_GOOD,
    n_test_defect: int = DEFAULT_TEST_DEFECT,
    seed: int = 0,
    defects: Sequence[str] = DEFECT_TYPES,
    texture_categories: Sequence[str] | None = None,
    n_textures: int = DEFAULT_TEXTURES,
) -> dict:
    """Validate the build parameters and return them as the manifest records them."""
    hw = _parse_size(size)
    if min(n_train, n_test_good, n_test_defect, n_textures) < 1:
        raise DemoDataError("counts must be >= 1: GLASS trains on good images with textures and tests on good and "
                            "defective ones")
    if seed < 0:
        raise DemoDataError(f"seed must be >= 0, got {seed}")
    return {
        "format": FORMAT_VERSION,
        "classes": _check_names(list(classes), list(CLASS_SOURCES), "class"),
        "size": list(hw),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_defect": int(n_test_defect),
        "seed": int(seed),
        "defects": _check_names(list(defects), DEFECT_TYPES, "defect"),
        "texture_categories": _check_names(
            list(TEXTURE_SOURCES) if texture_categories is None else list(texture_categories),
            list(TEXTURE_SOURCES),
            "texture category",
        ),
        "n_textures": int(n_textures),
    }


def build_demo_dataset(
    dest: str | Path,
    classes: Sequence[str] = DEFAULT_CLASSES,
    size: int | Sequence[int] | str = DEFAULT_SIZE,
    n_train: int = DEFAULT_TRAIN,
    n_test_good: int = DEFAULT_TEST_GOOD,
    n_test_defect: int = DEFAULT_TEST_DEFECT,
    seed: int = 0,
    defects: Sequence[str] = DEFECT_TYPES,
    texture_categories: Sequence[str] | None = None,
    n_textures: int = DEFAULT_TEXTURES,
    force: bool = False,
) -> Path:
    """Write the demo dataset under ``dest`` and return the MVTec-layout root ``dest/demo``.

    The anomaly textures go to ``dest/textures``. A complete earlier build with the same parameters
    is kept as is (unless ``force``); otherwise the folders this builder owns are rewritten.

    Args:
        dest: destination folder (created if missing).
        classes: class names, a subset of CLASS_SOURCES.
        size: image size, ``N`` or ``(H, W)`` / ``"HxW"``.
        n_train, n_test_good, n_test_defect: images per class; defects cycle through ``defects``.
        seed: seed of every random stream.
        defects: defect types to synthesise, a subset of DEFECT_TYPES.
        texture_categories: subset of TEXTURE_SOURCES (default: all of them).
        n_textures: tiles per texture category.
        force: rebuild even when a matching build exists.

    Returns:
        ``Path(dest) / "demo"``, the ``data_path`` to give the MVTec loader.
    """
    dest = Path(dest)
    params = demo_params(classes, size, n_train, n_test_good, n_test_defect, seed, defects,
                         texture_categories, n_textures)
    hw = tuple(params["size"])
    root = dest / "demo"
    if not force and is_complete(dest, params):
        LOGGER.info("demo dataset already complete at %s; nothing to do", root)
        return root
    _ensure_writable(dest)

    manifest_path = root / MANIFEST_NAME
    old = _read_manifest(manifest_path) or {}
    manifest_path.unlink(missing_ok=True)  # an interrupted build must not look complete
    old_params = old.get("params", {})
    for class_name in set(old_params.get("classes", [])) | set(params["classes"]):
        if class_name in CLASS_SOURCES:
            shutil.rmtree(root / class_name, ignore_errors=True)
    for category in set(old_params.get("texture_categories", [])) | set(params["texture_categories"]):
        if category in TEXTURE_SOURCES:
            shutil.rmtree(dest / "textures" / category, ignore_errors=True)

    photos: dict[str, np.ndarray] = {}
    counts: dict[str, dict[str, int]] = {}
    for class_name in params["classes"]:
        specs = plan_class(class_name, n_train, n_test_good, n_test_defect, params["defects"])
        per_folder: dict[str, int] = {}
        for spec in specs:
            sample = render_sample(spec, hw, seed, photos)
            _save_png(sample.image, root / spec.image_relpath)
            if sample.mask is not None:
                _save_png(sample.mask.astype(np.uint8) * 255, root / spec.mask_relpath)
            folder = f"{spec.split}/{spec.label}"
            per_folder[folder] = per_folder.get(folder, 0) + 1
        counts[class_name] = per_folder
        LOGGER.info("wrote %s: %s", root / class_name, per_folder)

    for category in params["texture_categories"]:
        photo = load_photo(TEXTURE_SOURCES[category])
        folder = dest / "textures" / category
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_textures):
            tile = _texture_tile(photo, category, i, hw, seed)
            Image.fromarray(tile).save(folder / f"{i:03d}.jpg", format="JPEG", quality=92)
    LOGGER.info("wrote %d texture categories x %d tiles to %s", len(params["texture_categories"]), n_textures,
                dest / "textures")

    manifest = {
        "params": params,
        "description": "real texture photographs from scikit-image with synthetic defects; NOT MVTec AD",
        "class_sources": {c: CLASS_SOURCES[c] for c in params["classes"]},
        "texture_sources": {c: TEXTURE_SOURCES[c] for c in params["texture_categories"]},
        "counts": counts,
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(manifest_path)
    return root


# --------------------------------------------------------------------------- CLI


@click.command(help="Build the offline demo dataset in DEST (scikit-image textures + synthetic defects, NOT MVTec AD).")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=",".join(DEFAULT_CLASSES), show_default=True,
              help=f"comma-separated, from: {', '.join(CLASS_SOURCES)}")
@click.option("--size", default=str(DEFAULT_SIZE), show_default=True, help="image side N, or HxW")
@click.option("--train", "n_train", type=click.IntRange(min=1), default=DEFAULT_TRAIN, show_default=True,
              help="train images per class")
@click.option("--test-good", "n_test_good", type=click.IntRange(min=1), default=DEFAULT_TEST_GOOD, show_default=True,
              help="good test images per class (at least 1: image AUROC needs good and defective test images)")
@click.option("--test-defect", "n_test_defect", type=click.IntRange(min=1), default=DEFAULT_TEST_DEFECT,
              show_default=True, help="defective test images per class (cycling through the defect types; at least 1)")
@click.option("--defects", default=",".join(DEFECT_TYPES), show_default=True, help="comma-separated defect types")
@click.option("--textures", "n_textures", type=click.IntRange(min=1), default=DEFAULT_TEXTURES, show_default=True,
              help="tiles per texture category")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--force", is_flag=True, help="rebuild even if a matching build exists")
def cli(dest: Path, classes: str, size: str, n_train: int, n_test_good: int, n_test_defect: int,
        defects: str, n_textures: int, seed: int, force: bool) -> None:
    """Build (or find complete) the demo dataset and print where everything is."""
    try:
        kwargs = dict(classes=classes.split(","), size=size, n_train=n_train, n_test_good=n_test_good,
                      n_test_defect=n_test_defect, seed=seed, defects=defects.split(","), n_textures=n_textures)
        skipped = not force and is_complete(dest, demo_params(**kwargs))
        root = build_demo_dataset(dest, force=force, **kwargs)
    except DemoDataError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    manifest = _read_manifest(root / MANIFEST_NAME) or {}
    params = manifest["params"]
    if skipped:
        click.echo(f"demo dataset already complete at {root} (same parameters); nothing rebuilt")
    else:
        click.echo(f"wrote demo dataset (scikit-image textures, synthetic defects; NOT MVTec AD) to {root}")
        for class_name, folders in manifest["counts"].items():
            listing = ", ".join(f"{folder}: {n}" for folder, n in sorted(folders.items()))
            click.echo(f"  {class_name} ({params['size'][0]}x{params['size'][1]}): {listing}")
    click.echo(f"  data_path: {root}")
    click.echo(f"  aug_path:  {dest / 'textures'} ({len(params['texture_categories'])} categories x "
               f"{params['n_textures']} .jpg)")
    click.echo(f"  classes:   {' '.join(params['classes'])}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``python -m datasets.demo DEST [options]``) and return its exit status."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="python -m datasets.demo")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

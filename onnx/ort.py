"""Score images with an exported GLASS model (``glass.onnx``) using onnxruntime only.

Deployable alone: it needs numpy, Pillow, OpenCV and onnxruntime, not this repository. The
preprocessing is the test transform of training (Resize of the shorter side, CenterCrop, ToTensor,
ImageNet Normalize), with the sizes and mean/std read from the model's metadata.

Writes ``<output>/predictions.csv`` (image, score, threshold, anomalous, heatmap, overlay) and, per
image, ``<name>_heatmap.png`` (the anomaly map, 0..1 on the jet colour scale) and ``<name>_overlay.png``
(the cropped input blended with the heatmap). The progress goes to stderr: a bar on a terminal (where tqdm is
installed), else a log line every 30 s. Ctrl-C stops it with one line, and no predictions.csv is written then.

Example::

    python onnx/ort.py results/models/backbone_0/mvtec_tire/glass.onnx 'new_images/*.png' -o ort_out
"""
from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import logging
import os
import sys
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import cv2
import numpy as np
import onnxruntime
from PIL import Image


# This script stands alone (no import from the project): these copy datasets.base.IMAGE_EXTENSIONS and
# glass.PREDICTION_COLUMNS, and collect_images/output_stems below copy datasets/inputs.py's, so that `ort.py` and
# `main.py predict` take the same inputs and write the same table; tests/test_onnx.py compares them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CSV_COLUMNS = ["image", "score", "threshold", "anomalous", "heatmap", "overlay"]
LOGGER = logging.getLogger(__name__)
# Without a terminal (a log file, a pipe), scoring logs its progress at most this often instead of a bar.
PROGRESS_SECONDS = 30.0


class UsageError(Exception):
    """A mistake in the command line or the inputs; printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------------
# Model and metadata

OUTPUT_NAMES = ("image_score", "anomaly_map")
# Metadata that sets the preprocessing: key, type, how many values (mean may be negative; the rest must be > 0).
METADATA_NUMBERS = (("resize", int, (1, 2)), ("imagesize", int, (1, 2)), ("mean", float, (3,)), ("std", float, (3,)))


def _numbers(text: str, kind=float) -> List:
    return [kind(v) for v in text.split(",") if v.strip()]


def _finite(text: str) -> Optional[float]:
    """``text`` as a finite float, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _not_usable(name: str, why: str) -> UsageError:
    return UsageError(f"{name} is not a usable GLASS export ({why}): export it again with onnx/pth2onnx.py")


def read_metadata(session: onnxruntime.InferenceSession, name: str = "the model") -> Dict:
    """Preprocessing and provenance from the model's metadata_props (as written by pth2onnx.py), checked.

    ``name`` (the model's path) goes into the one-line error when the metadata cannot be used.
    """
    props = session.get_modelmeta().custom_metadata_map
    missing = [key for key, _, _ in METADATA_NUMBERS if key not in props]
    if missing:
        raise _not_usable(name, f"no {', '.join(missing)} in its metadata")
    meta = dict(props)
    for key, kind, counts in METADATA_NUMBERS:
        try:
            values = _numbers(props[key], kind)
        except ValueError:
            values = []
        if len(values) not in counts or not all(np.isfinite(values)) or (key != "mean" and min(values) <= 0):
            raise _not_usable(name, f"its metadata {key} is {props[key]!r}")
        meta[key] = values if kind is int else np.asarray(values, dtype=np.float32)
    meta["threshold"] = None
    if props.get("threshold"):
        meta["threshold"] = _finite(props["threshold"])
        if meta["threshold"] is None:
            raise _not_usable(name, f"its metadata threshold is {props['threshold']!r}")
    return meta


def check_graph(session: onnxruntime.InferenceSession, meta: Dict, name: str = "the model") -> None:
    """The graph takes one (B, 3, H, W) image of the metadata's crop size and gives GLASS's outputs."""
    outputs = [output.name for output in session.get_outputs()]
    absent = [output for output in OUTPUT_NAMES if output not in outputs]
    if absent:
        raise _not_usable(name, f"it has no output {', '.join(absent)}")
    inputs = session.get_inputs()
    height, width = (meta["imagesize"] * 2)[:2]
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or any(
            isinstance(have, int) and have != want for have, want in zip(inputs[0].shape[1:], (3, height, width))):
        shapes = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise _not_usable(name, f"it takes {shapes or 'no input'}, not one image batch (B, 3, {height}, {width})")


def open_session(model_path: str, providers: Optional[Sequence[str]] = None) -> onnxruntime.InferenceSession:
    """An inference session on ``providers`` (default: every provider this onnxruntime has)."""
    if os.path.isdir(model_path):
        raise UsageError(f"model {model_path} is a folder, not an ONNX file: give the .onnx file first, then the "
                         "images (python onnx/ort.py MODEL.onnx INPUTS ...)")
    if not os.path.isfile(model_path):
        raise UsageError(f"model {model_path} does not exist: export one with onnx/pth2onnx.py")
    available = onnxruntime.get_available_providers()
    chosen = list(providers) if providers else available
    unknown = [p for p in chosen if p not in available]
    if unknown:
        raise UsageError(f"provider(s) {', '.join(unknown)} not available in this onnxruntime: choose from {', '.join(available)}")
    try:
        return onnxruntime.InferenceSession(model_path, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types for damaged files
        raise UsageError(f"cannot load {model_path} ({type(exc).__name__}): the file is damaged or not an ONNX model") from None


# --------------------------------------------------------------------------------------------------
# Images

def is_image(name: str) -> bool:
    """Whether ``name`` has an image extension (any case) and is not hidden (macOS's ``._*`` files are not images)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


OUTPUT_SUFFIXES = ("_heatmap.png", "_overlay.png")  # the files written per image besides predictions.csv


def collect_images(inputs: Sequence[str], output_dir: Optional[str] = None) -> List[str]:
    """Image files named by ``inputs``: files, folders (searched recursively) and glob patterns, in order. Heatmaps
    and overlays that an earlier run wrote to ``output_dir`` are not inputs, unless named one by one."""
    found: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            matches = files_below(item)
        elif os.path.isfile(item):
            matches = [item]
        elif os.path.islink(item) and not os.path.exists(item):
            raise UsageError(f"{item} is a broken link (to {os.readlink(item)}, which does not exist): fix or remove it")
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UsageError(f"{item} matched no file: give image files, folders or glob patterns such as 'dir/*.png'")
        if output_dir is not None and matches != [item]:
            matches = [m for m in matches if not is_earlier_output(m, output_dir)]
        images = [m for m in matches if os.path.isfile(m) and is_image(os.path.basename(m))]
        if not images:
            raise UsageError(f"{item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        found.extend(images)
    return list(dict.fromkeys(found))


def is_earlier_output(path: str, output_dir: str) -> bool:
    """Whether ``path`` is a heatmap or overlay in ``output_dir`` (or below it), where predictions are written."""
    if not path.endswith(OUTPUT_SUFFIXES):
        return False
    output = os.path.realpath(output_dir)
    return os.path.commonpath([os.path.realpath(path), output]) == output


def files_below(folder: str) -> List[str]:
    """The files in ``folder`` and its subfolders, sorted; hidden folders skipped, linked folders followed, but
    each folder read once (a link back up the tree is not a loop)."""
    seen = set()
    found = []
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        found.extend(os.path.join(root, name) for name in files)
    return sorted(found)


def output_stems(paths: Sequence[str]) -> List[str]:
    """Unique file-name stems: each path relative to the inputs' common folder, '/' turned into '_'; a stem too
    long for a file name keeps its start and ends in a hash of the whole."""
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    stems, seen = [], set()
    for i, path in enumerate(absolute):
        stem = short_stem(os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "_"))
        if stem in seen:
            stem = f"{stem}_{i}"
        seen.add(stem)
        stems.append(stem)
    return stems


def short_stem(stem: str, limit: int = 255 - len("_heatmap.png") - 8) -> str:
    """``stem`` if it takes at most ``limit`` bytes, else its start and 8 hex digits of its hash, within ``limit``."""
    if len(os.fsencode(stem)) <= limit:
        return stem
    kept = stem[:limit - 9]  # whole characters, each of at least one byte
    while len(os.fsencode(kept)) > limit - 9:
        kept = kept[:-1]
    return kept + "_" + hashlib.sha1(os.fsencode(stem)).hexdigest()[:8]


def write_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 BGR image as a PNG file (``cv2.imwrite`` crashes on paths that are not valid UTF-8 and
    returns False where it cannot write); a failure is a UsageError naming the file."""
    encoded, data = cv2.imencode(".png", image)
    try:
        if not encoded:
            raise OSError(f"OpenCV cannot encode an image of shape {image.shape}")
        with open(path, "wb") as handle:
            handle.write(data.tobytes())
    except OSError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror or exc}): choose another --output") from None


def _resized_size(width: int, height: int, resize: Sequence[int]) -> Tuple[int, int]:
    """torchvision's Resize: one number sets the shorter side (the longer one rounded down), two set (h, w)."""
    if len(resize) > 1:
        return int(resize[1]), int(resize[0])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(resize[0]), int(int(resize[0]) * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's CenterCrop (zero padding when the image is smaller than the crop)."""
    if width > image.width or height > image.height:
        left = (width - image.width) // 2 if width > image.width else 0
        top = (height - image.height) // 2 if height > image.height else 0
        canvas = Image.new(image.mode, (max(width, image.width), max(height, image.height)))
        canvas.paste(image, (left, top))
        image = canvas
        if image.size == (width, height):
            return image
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


# An image that resizing would make larger than this is refused (as datasets.base.MAX_RESIZED_PIXELS).
MAX_RESIZED_PIXELS = 2 ** 26
# Pillow modes of more than 8 bits per pixel and channel (as datasets.base.WIDE_MODES; this script stands alone).
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def preprocess(path: str, meta: Dict) -> Tuple[np.ndarray, np.ndarray]:
    """(3, H, W) float32 model input and the (H, W, 3) uint8 RGB crop it was made from."""
    try:
        with Image.open(path) as handle:  # the header only, until convert decodes the image
            size = _resized_size(handle.width, handle.height, meta["resize"])
            if size[0] * size[1] > MAX_RESIZED_PIXELS:
                raise UsageError(f"image {path} is {handle.width}x{handle.height} pixels: resized it would take "
                                 f"{size[0] * size[1] / 1e6:.0f} million pixels; crop it to a less elongated image")
            if handle.mode in WIDE_MODES:
                LOGGER.warning(
                    "%s has more than 8 bits per pixel (%s): converted to 8-bit RGB as training reads images, with "
                    "every value above 255 clipped (16-bit images turn mostly white, 0..1 float ones black); convert "
                    "it to 8 bits first", path, handle.mode)
            image = handle.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"cannot read image {path} ({exc}): replace or remove the file") from None
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    height, width = (meta["imagesize"] * 2)[:2] if len(meta["imagesize"]) == 1 else meta["imagesize"][:2]
    crop = np.asarray(_center_crop(image, height, width), dtype=np.uint8)
    tensor = (crop.astype(np.float32) / 255.0 - meta["mean"]) / meta["std"]
    return np.ascontiguousarray(tensor.transpose(2, 0, 1), dtype=np.float32), crop


def readable_header(path: str) -> bool:
    """Whether Pillow can read the image file's header."""
    try:
        with Image.open(path):
            return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def heatmap_image(anomaly_map: np.ndarray) -> np.ndarray:
    """BGR jet colouring of a map whose values are anomaly probabilities (0..1, not rescaled per image)."""
    levels = np.round(np.clip(anomaly_map, 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.applyColorMap(levels, cv2.COLORMAP_JET)


def overlay_image(crop_rgb: np.ndarray, heatmap_bgr: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The cropped input (BGR) blended with the heatmap."""
    return cv2.addWeighted(cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2BGR), 1 - alpha, heatmap_bgr, alpha, 0)


# --------------------------------------------------------------------------------------------------
# Scoring

def score_images(
    session: onnxruntime.InferenceSession, meta: Dict, paths: Sequence[str], batch_size: int = 8
) -> Iterator[Tuple[str, float, np.ndarray, np.ndarray]]:
    """Yield ``(path, score, anomaly_map, crop)`` for every image, batch by batch."""
    input_name = session.get_inputs()[0].name
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        prepared = [preprocess(path, meta) for path in chunk]
        batch = np.stack([tensor for tensor, _ in prepared])
        scores, maps = session.run(list(OUTPUT_NAMES), {input_name: batch})
        for path, (_, crop), score, anomaly_map in zip(chunk, prepared, scores, maps):
            yield path, float(score), anomaly_map, crop


T = TypeVar("T")


def with_progress(items: Iterable[T], total: int, every: Optional[float] = None) -> Iterator[T]:
    """``items`` as they come, with the progress on stderr: on a terminal a tqdm bar (where tqdm is installed), else
    a log line at most every ``every`` seconds (default PROGRESS_SECONDS), as training's bar becomes log lines in a
    log file."""
    every = PROGRESS_SECONDS if every is None else every
    if sys.stderr.isatty():
        try:
            import tqdm  # not needed to deploy this script: without it, log lines
        except ImportError:
            pass
        else:
            yield from tqdm.tqdm(items, total=total, desc="Scoring", unit="image", leave=False, dynamic_ncols=True)
            return
    last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        if done < total and time.monotonic() - last >= every:
            LOGGER.info("Scored %d of %d images", done, total)
            last = time.monotonic()


def predict(
    model_path: str,
    inputs: Sequence[str],
    output: str,
    threshold: Optional[float] = None,
    batch_size: int = 8,
    providers: Optional[Sequence[str]] = None,
    write_images: bool = True,
) -> List[Dict[str, str]]:
    """Score ``inputs`` with the model; write the CSV (and PNGs). Returns the CSV rows."""
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, not {batch_size}")
    if threshold is not None and not np.isfinite(threshold):
        raise UsageError(f"--threshold {threshold} is not a finite number: give a score such as 0.5, or leave it out to use the model's")
    session = open_session(model_path, providers)
    meta = read_metadata(session, model_path)
    check_graph(session, meta, model_path)
    threshold = meta["threshold"] if threshold is None else threshold
    paths = collect_images(inputs, output)
    unreadable = [path for path in paths if not readable_header(path)]
    if len(unreadable) > 1:  # all of them at once (preprocess says why for one)
        shown = ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        raise UsageError(f"{len(unreadable)} images cannot be read ({shown}): replace them, or leave them out of the inputs")
    stems = output_stems(paths)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {output} ({exc.strerror}): choose another --output") from None
    rows = []
    LOGGER.info("Scoring %d image(s) with %s", len(paths), model_path)
    scored = with_progress(score_images(session, meta, paths, batch_size), len(paths))
    for stem, (path, score, anomaly_map, crop) in zip(stems, scored):
        row = {"image": path, "score": repr(score), "threshold": "", "anomalous": "", "heatmap": "", "overlay": ""}
        if threshold is not None:
            row["threshold"] = repr(float(threshold))
            row["anomalous"] = str(int(score >= threshold))
        if write_images:
            heat = heatmap_image(anomaly_map)
            row["heatmap"] = os.path.join(output, f"{stem}_heatmap.png")
            row["overlay"] = os.path.join(output, f"{stem}_overlay.png")
            write_png(row["heatmap"], heat)
            write_png(row["overlay"], overlay_image(crop, heat))
        rows.append(row)
    path = os.path.join(output, "predictions.csv")
    try:  # written whole, then renamed: no half-written table
        with open(path + ".tmp", "w", newline="", errors="surrogateescape") as handle:  # file names as on disk
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(path + ".tmp", path)
    except OSError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror or exc}): choose another --output") from None
    finally:
        if os.path.isfile(path + ".tmp"):
            os.remove(path + ".tmp")
    return rows


# --------------------------------------------------------------------------------------------------
# Command line

class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default only where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"Error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ort.py."""
    parser = _Parser(
        prog="python onnx/ort.py",
        description="Score images with an exported GLASS model (onnxruntime only): a CSV of image scores and "
                    "decisions, and heatmap and overlay PNGs.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("model", help="the .onnx file written by onnx/pth2onnx.py")
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or quoted glob patterns")
    parser.add_argument("-o", "--output", default="ort_predictions", help="folder for predictions.csv and the PNGs")
    parser.add_argument("--threshold", type=float, default=None,
                        help="score at or above which an image is anomalous (default: the one stored in the model, if any)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per onnxruntime call")
    parser.add_argument("--providers", default=None,
                        help="comma-separated onnxruntime execution providers (default: all available, e.g. CUDAExecutionProvider first)")
    parser.add_argument("--no_images", action="store_true", help="write only the CSV, no heatmap/overlay PNGs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; mistakes print one line on stderr and exit with code 2."""
    for stream in (sys.stdout, sys.stderr):  # file names that are not valid UTF-8 print escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    try:
        rows = predict(args.model, args.inputs, args.output, threshold=args.threshold, batch_size=args.batch_size,
                       providers=providers, write_images=not args.no_images)
    except UsageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # one line, as main.py; predictions.csv is written last, whole or not at all
        kept = "" if args.no_images else f" (the heatmaps and overlays written so far stay in {args.output})"
        print(f"Interrupted (Ctrl-C): no predictions.csv written{kept}; rerun the same command to score every image "
              "again.", file=sys.stderr)
        return 130
    flagged = sum(row["anomalous"] == "1" for row in rows)
    decision = f", {flagged} anomalous at threshold {rows[0]['threshold']}" if rows and rows[0]["threshold"] else \
        " (no threshold in the model: pass --threshold for the anomalous column)"
    print(f"Scored {len(rows)} image(s){decision}: {os.path.join(args.output, 'predictions.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

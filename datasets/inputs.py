"""Predict's inputs: image files, folders and glob patterns turned into a list of images, and the unique
file-name stems of their outputs (``<stem>_heatmap.png``, ``<stem>_overlay.png``).

``onnx/ort.py`` keeps a copy of these functions so that it runs without this repository; a test checks that
both give the same lists.
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import List, Optional, Sequence

from datasets.base import IMAGE_EXTENSIONS, is_broken_link, is_image
from utils import GlassError

HEATMAP_SUFFIX, OVERLAY_SUFFIX = "_heatmap.png", "_overlay.png"  # written per image besides predictions.csv
OUTPUT_SUFFIXES = (HEATMAP_SUFFIX, OVERLAY_SUFFIX)
NAME_MAX = 255  # bytes in a file name on the usual file systems


def collect_images(inputs: Sequence[str], output_dir: Optional[str] = None) -> List[str]:
    """Image files named by ``inputs``: files, folders (searched recursively) and glob patterns, in order. Heatmaps
    and overlays that an earlier run wrote to ``output_dir`` are not inputs, unless named one by one."""
    found: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            matches = files_below(item)
        elif os.path.isfile(item):
            matches = [item]
        elif is_broken_link(item):
            raise GlassError(f"{item} is a broken link (to {os.readlink(item)}, which does not exist): fix or remove it")
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise GlassError(f"{item} matched no file: give image files, folders or glob patterns such as 'dir/*.png'")
        if output_dir is not None and matches != [item]:
            matches = [m for m in matches if not is_earlier_output(m, output_dir)]
        images = [m for m in matches if os.path.isfile(m) and is_image(os.path.basename(m))]
        if not images:
            raise GlassError(f"{item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
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
    stems: List[str] = []
    for i, path in enumerate(absolute):
        stem = short_stem(os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "_"))
        stems.append(f"{stem}_{i}" if stem in stems else stem)
    return stems


def short_stem(stem: str, limit: int = NAME_MAX - max(map(len, OUTPUT_SUFFIXES)) - 8) -> str:
    """``stem`` if it takes at most ``limit`` bytes, else its start and 8 hex digits of its hash, within ``limit``."""
    if len(os.fsencode(stem)) <= limit:
        return stem
    kept = stem[:limit - 9]  # whole characters, each of at least one byte
    while len(os.fsencode(kept)) > limit - 9:
        kept = kept[:-1]
    return kept + "_" + hashlib.sha1(os.fsencode(stem)).hexdigest()[:8]

"""Small shared helpers: user-facing errors, seeding, devices, image conversion and result files."""
from __future__ import annotations

import csv
import logging
import os
import random
import tempfile
from typing import Iterable, Sequence

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class GlassError(Exception):
    """A mistake in the user's input or environment.

    The CLI prints its message on one line (no traceback) and exits with code 2, so the
    message must say what is wrong and how to fix it.
    """


def fix_seeds(seed: int, device: torch.device | None = None) -> None:
    """Seed python, NumPy and torch (and CUDA); make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def select_device(gpu_ids: Sequence[int]) -> torch.device:
    """CUDA device ``gpu_ids[0]`` when asked for and present, else MPS, else CPU.

    ``--gpu -1`` (or no id) asks for the CPU explicitly.
    """
    wanted = [g for g in gpu_ids if g >= 0]
    if wanted and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if wanted[0] >= count:
            raise GlassError(f"--gpu {wanted[0]} is not present: this machine has {count} CUDA device(s) (ids 0..{count - 1})")
        device = torch.device(f"cuda:{wanted[0]}")
        LOGGER.info("Device: %s (%s)", device, torch.cuda.get_device_name(device))
    elif wanted and torch.backends.mps.is_available():
        device = torch.device("mps")
        LOGGER.info("Device: mps (no CUDA device found)")
    else:
        device = torch.device("cpu")
        reason = "asked for with --gpu -1" if not wanted else "no CUDA or MPS device found"
        LOGGER.info("Device: cpu (%s)", reason)
    return device


def torch_format_2_numpy_img(img: np.ndarray) -> np.ndarray:
    """CHW array -> HWC uint8 BGR image. Three channels are ImageNet-normalised RGB; one channel is [0, 1]."""
    img = np.asarray(img)
    if img.shape[0] == 3:
        img = img.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
        img = img[:, :, [2, 1, 0]]
    else:
        img = np.repeat(img.transpose(1, 2, 0), 3, axis=-1)
    return (np.clip(img, 0, 1) * 255).astype("uint8")


def atomic_write(path: str, write: "callable") -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a kill leaves the old file intact."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes the file private (0600); keep the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # read once, at import, while no other thread can be creating files


def _file_mode(path: str) -> int:
    """The mode of the file being replaced, or that of a new file under the process's umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return 0o666 & ~_UMASK


def write_json(path: str, data: dict) -> None:
    """JSON with sorted keys and indentation (values that JSON lacks are written as strings)."""
    import json

    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)


def read_json(path: str) -> dict:
    import json

    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise GlassError(f"cannot read {path} ({exc}): the file is damaged; train the class again") from None


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` through a temporary file and a rename."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def format_metric(value: float) -> str:
    """Percent with two decimals, or 'n/a' for a metric that could not be computed."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value * 100:.2f}"


def compute_and_store_final_results(
    results_path: str,
    results: Sequence[Sequence[float]],
    column_names: Sequence[str],
    row_names: Sequence[str] | None = None,
) -> dict:
    """Write ``<results_path>/results.csv``: one row per class and a ``Mean`` row (values as fractions).

    Metrics that are not available (NaN) are written as empty cells and left out of the mean.
    """
    if row_names is not None and len(row_names) != len(results):
        raise ValueError("one row name per result row is needed")
    means = {}
    for i, key in enumerate(column_names):
        values = np.array([row[i] for row in results], dtype=float)
        values = values[np.isfinite(values)]
        means[key] = float(values.mean()) if len(values) else float("nan")

    def cell(value):
        return "" if isinstance(value, float) and not np.isfinite(value) else value

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow((["Row Names"] if row_names is not None else []) + list(column_names))
            for i, row in enumerate(results):
                writer.writerow(([row_names[i]] if row_names is not None else []) + [cell(v) for v in row])
            writer.writerow((["Mean"] if row_names is not None else []) + [cell(v) for v in means.values()])

    atomic_write(os.path.join(results_path, "results.csv"), write)
    return {f"mean_{key}": value for key, value in means.items()}


# --------------------------------------------------------------------------------------------------
# Distribution judgement: manifold (svd 0) or hypersphere (svd 1) hypothesis per class.

def distribution_judge(img: np.ndarray, name: str, output_dir: str | None = None) -> int:
    """Judge a class from its mean training image (HWC uint8 BGR): 1 = hypersphere, 0 = manifold.

    The image is resized to 289x289, turned grey, box-blurred (39x39) and Fourier-transformed; the
    log magnitude ``20 ln|F|`` is thresholded at 170. From the lit points: their maximal L1 extents
    from the centre, maximal radius and count. Hypersphere when either density exceeds 0.21 and the
    radius exceeds 12 and there are more than 60 points. With ``output_dir`` the image and its
    thresholded spectrum are written to ``<output_dir>/<flag>/<name>.png``.
    """
    import cv2

    resized = cv2.resize(img, (289, 289))
    gray = cv2.blur(cv2.cvtColor(resized, cv2.COLOR_BGR2GRAY), (39, 39))
    spectrum = np.fft.fftshift(cv2.dft(np.float32(gray), flags=cv2.DFT_COMPLEX_OUTPUT))
    with np.errstate(divide="ignore"):
        magnitude = 20 * np.log(cv2.magnitude(spectrum[:, :, 0], spectrum[:, :, 1]))
    magnitude = np.where(magnitude > 170, 255.0, 0.0).astype(np.float32)

    height, width = magnitude.shape
    cy, cx = height // 2, width // 2
    ys, xs = np.nonzero(magnitude == 255)
    count = len(ys)
    side_x = int(np.abs(xs - cx).max()) if count else 0
    side_y = int(np.abs(ys - cy).max()) if count else 0
    radius = float(np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2).max()) if count else 0.0
    # Grid points within `radius` of the centre, counted on a (2h, 2w) grid as the reference does.
    yy, xx = np.indices((2 * height, 2 * width))
    disc_area = np.sum(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) <= radius)
    l1_density = count / (4 * max(side_x, 1) * max(side_y, 1))
    l2_density = count / (disc_area + 1e-10)
    flag = int((l1_density > 0.21 or l2_density > 0.21) and radius > 12 and count > 60)
    LOGGER.info("Distribution of %s: %d (%s)", name, flag, "hypersphere" if flag else "manifold")

    if output_dir is not None:
        panel = np.hstack([resized, np.repeat(magnitude, 3).reshape(height, width, 3).astype(np.uint8)])
        path = os.path.join(output_dir, str(flag), f"{name}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, panel)
    return flag


DISTRIBUTION_COLUMNS = ["Class", "Distribution", "Foreground"]


def excel_path(excel_dir: str, dataset_name: str) -> str:
    """``<excel_dir>/<dataset>_distribution.xlsx``."""
    return os.path.join(excel_dir, f"{dataset_name}_distribution.xlsx")


def lookup_distribution(excel_dirs: Iterable[str], dataset_name: str, class_key: str) -> tuple[int, int] | None:
    """(Distribution, Foreground) of ``class_key`` (``<dataset>_<class>``) from the first xlsx that lists it."""
    import pandas as pd

    for directory in excel_dirs:
        path = excel_path(directory, dataset_name)
        if not os.path.isfile(path):
            continue
        try:
            table = pd.read_excel(path)
        except Exception as exc:  # a damaged table is not fatal: the class is judged instead
            LOGGER.warning("Could not read %s (%s); ignoring it", path, exc)
            continue
        rows = table.loc[table["Class"] == class_key]
        if len(rows):
            return int(rows["Distribution"].values[0]), int(rows["Foreground"].values[0])
    return None


def record_distributions(excel_dir: str, dataset_name: str, judged: dict[str, int]) -> str:
    """Merge judged ``{class_key: flag}`` into ``<excel_dir>/<dataset>_distribution.xlsx`` (atomic)."""
    import pandas as pd

    path = excel_path(excel_dir, dataset_name)
    table = pd.DataFrame(columns=DISTRIBUTION_COLUMNS)
    if os.path.isfile(path):
        try:
            table = pd.read_excel(path)[DISTRIBUTION_COLUMNS]
        except Exception as exc:
            LOGGER.warning("Could not read %s (%s); writing a new table", path, exc)
    table = table[~table["Class"].isin(list(judged))]
    new_rows = pd.DataFrame(
        {"Class": list(judged), "Distribution": list(judged.values()), "Foreground": list(judged.values())}
    )
    table = new_rows if table.empty else pd.concat([table, new_rows], ignore_index=True)
    atomic_write(path, lambda tmp: table.to_excel(tmp, index=False, engine="openpyxl"))
    return path


# --------------------------------------------------------------------------------------------------
# Error messages and the record of a run

def error_message(exc: BaseException) -> str:
    """One line for the user from an exception, unwrapping DataLoader workers' re-raised errors.

    A worker's exception comes back as ``Caught GlassError in DataLoader worker process 0.`` plus the
    worker's traceback, all in the message; the original message is the traceback's last line.
    """
    text = str(exc).strip()
    if "\n" in text and "Traceback" in text:
        last = text.splitlines()[-1].strip()
        name = type(exc).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return " ".join(text.split())


PACKAGES = (
    "torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "scikit-image", "pillow",
    "opencv-python", "opencv-python-headless", "pandas", "openpyxl", "click", "tensorboard", "tqdm",
)


def package_versions(names: Sequence[str] = PACKAGES) -> dict:
    """Installed version of each distribution (those not installed are left out)."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(directory: str) -> str:
    """The commit checked out in ``directory`` (``+dirty`` with local changes), or ``unknown``."""
    import subprocess

    def git(*args: str) -> str:
        # --no-optional-locks: a read that never writes the index.
        return subprocess.run(["git", "--no-optional-locks", "-C", directory, *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "") if commit else "unknown"


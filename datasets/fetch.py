"""Download a public anomaly-detection dataset and turn it into the layout the loaders read.

Usage::

    python -m datasets.fetch NAME DEST [--force] [--base-url URL] [--keep-archive]

NAME is one of ``mvtec`` (MVTec AD), ``visa`` (VisA), ``mpdd`` (MPDD), ``btad`` (BTAD) or ``dtd``
(Describable Textures Dataset, GLASS's ``aug_path``). The steps:

1. If ``DEST`` already holds a finished conversion (a marker file in its folder), say so and stop.
2. If the archive already sits in ``DEST`` (put there by hand, or by an earlier run), verify its
   checksum and use it; otherwise download it from the official address (or from
   ``<base-url>/<file name>`` when ``--base-url`` names a mirror), verifying the checksum on the way.
   Without a network the command prints one line naming the file, the URL and where to put it.
3. Unpack it safely (members with absolute paths or ``..`` are refused) into a scratch folder.
4. Convert to the loader's layout and move the result into place; write the marker.

Result folders (what to pass to ``main.py``)::

    mvtec  DEST/mvtec_anomaly_detection/<class>/{train,test,ground_truth}/...
    mpdd   DEST/mpdd/<class>/{train,test,ground_truth}/...
    btad   DEST/btad/<01|02|03>/{train/good, test/good, test/ko, ground_truth/ko/<stem>_mask.png}
    visa   DEST/VisA_20220922/{<class>/Data/..., split_csv/1cls.csv}
    dtd    DEST/dtd/images/<category>/*.jpg

Checksums come from public code that pins the same archives (anomalib, torchvision); where none is
published the tool prints the sha256 it computed and warns that it could not verify the file.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator, Sequence

import click
from tqdm import tqdm

from datasets.base import is_image
from datasets.visa import VISA_CLASSES
from utils import GlassError, make_writable_folder

LOGGER = logging.getLogger(__name__)

MARKER_NAME = ".glass_fetch.json"
CHUNK = 1 << 20
TIMEOUT_S = 60.0
USER_AGENT = "glass-fetch/1.0 (+python urllib)"
_ALGORITHMS = {"sha256": 64, "md5": 32}


@dataclass(frozen=True)
class DataFile:
    """One file to download: official URLs (tried in order), local file name and checksum.

    ``checksum`` is ``"sha256:<hex>"`` or ``"md5:<hex>"``, or None where no published value was found.
    """

    file_name: str
    urls: tuple[str, ...]
    checksum: str | None = None
    checksum_source: str = ""

    def __post_init__(self) -> None:
        if self.checksum is not None:
            algorithm, _, digest = self.checksum.partition(":")
            if _ALGORITHMS.get(algorithm) != len(digest) or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"checksum must be 'sha256:<64 hex>' or 'md5:<32 hex>', got {self.checksum!r}")


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from and where its converted copy goes.

    Attributes:
        name: registry key (the CLI's NAME).
        title: human-readable name.
        homepage: official page (licence, terms, manual download).
        archive: the main archive.
        folder: folder under DEST that the conversion produces.
        data_subpath: path inside ``folder`` to hand to ``main.py`` ("" = the folder itself).
        manual: True where the official host has no direct link (the archive must be put in DEST by
            hand, unless ``--base-url`` names a mirror).
        extras: further files a conversion may need (fetched only if the archive lacks them).
    """

    name: str
    title: str
    homepage: str
    archive: DataFile
    folder: str
    data_subpath: str = ""
    manual: bool = False
    extras: tuple[DataFile, ...] = field(default_factory=tuple)

    @property
    def file_name(self) -> str:
        return self.archive.file_name

    @property
    def urls(self) -> tuple[str, ...]:
        return self.archive.urls

    @property
    def checksum(self) -> str | None:
        return self.archive.checksum


DATASETS: dict[str, DatasetSource] = {
    "mvtec": DatasetSource(
        name="mvtec",
        title="MVTec AD",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        archive=DataFile(
            file_name="mvtec_anomaly_detection.tar.xz",
            urls=("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
                  "420938113-1629952094/mvtec_anomaly_detection.tar.xz",),
            # anomalib's MVTec AD datamodule pins this sha256; its older releases pinned
            # md5:eefca59f2cede9c3fc5b6befbfec275e for the same URL.
            checksum="sha256:cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
            checksum_source="anomalib src/anomalib/data/datamodules/image/mvtecad.py (DOWNLOAD_INFO)",
        ),
        folder="mvtec_anomaly_detection",
    ),
    "visa": DatasetSource(
        name="visa",
        title="VisA (Visual Anomaly)",
        homepage="https://github.com/amazon-science/spot-diff",
        archive=DataFile(
            file_name="VisA_20220922.tar",
            urls=("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",),
            # anomalib's VisA datamodule; older anomalib releases pinned md5:ef908989b6dc701fc218f643c127a4de.
            checksum="sha256:2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
            checksum_source="anomalib src/anomalib/data/datamodules/image/visa.py (DOWNLOAD_INFO)",
        ),
        folder="VisA_20220922",
        extras=(
            # The official 1-class split; used only when the archive has no split_csv/1cls.csv.
            DataFile(
                file_name="1cls.csv",
                urls=("https://raw.githubusercontent.com/amazon-science/spot-diff/main/split_csv/1cls.csv",),
                checksum=None,
                checksum_source="none published",
            ),
        ),
    ),
    "mpdd": DatasetSource(
        name="mpdd",
        title="MPDD (Metal Parts Defect Detection)",
        homepage="https://github.com/stepanje/MPDD",
        archive=DataFile(
            file_name="MPDD.zip",
            # A OneDrive folder page, not a file: download the MPDD folder as a zip by hand.
            urls=("https://vutbr-my.sharepoint.com/:f:/g/personal/xjezek16_vutbr_cz/"
                  "EhHS_ufVigxDo3MC6Lweau0BVMuoCmhMZj6ddamiQ7-FnA?e=oHKCxI",),
            checksum=None,
            checksum_source="none published (OneDrive folder download, zipped on the fly)",
        ),
        folder="mpdd",
        manual=True,
    ),
    "btad": DatasetSource(
        name="btad",
        title="BTAD (beanTech Anomaly Detection)",
        homepage="https://avires.dimi.uniud.it/papers/btad/",
        archive=DataFile(
            file_name="btad.zip",
            urls=("https://avires.dimi.uniud.it/papers/btad/btad.zip",),
            checksum="sha256:461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
            checksum_source="anomalib src/anomalib/data/datamodules/image/btech.py (DOWNLOAD_INFO)",
        ),
        folder="btad",
    ),
    "dtd": DatasetSource(
        name="dtd",
        title="DTD (Describable Textures Dataset)",
        homepage="https://www.robots.ox.ac.uk/~vgg/data/dtd/",
        archive=DataFile(
            file_name="dtd-r1.0.1.tar.gz",
            urls=("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
                  "https://thor.robots.ox.ac.uk/dtd/dtd-r1.0.1.tar.gz"),
            # anomalib's GLASS and DRAEM models (DTD_DOWNLOAD_INFO); torchvision.datasets.DTD pins
            # md5:fff73e5086ae6bdbea199a49dfb8a4c1 for the same file.
            checksum="sha256:e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
            checksum_source="anomalib src/anomalib/models/image/glass/lightning_model.py (DTD_DOWNLOAD_INFO)",
        ),
        folder="dtd",
        data_subpath="images",
    ),
}


# --------------------------------------------------------------------------------------------------
# Public helpers


def get_source(name: str) -> DatasetSource:
    """The registry entry for ``name`` (case-insensitive); GlassError if unknown."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise GlassError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}") from None


def data_path(name: str, dest: str | Path) -> Path:
    """The folder ``fetch(name, dest)`` produces and returns (pass it to ``main.py``)."""
    source = get_source(name)
    target = Path(dest).expanduser() / source.folder
    return target / source.data_subpath if source.data_subpath else target


def is_fetched(name: str, dest: str | Path) -> bool:
    """True when ``dest`` holds a finished conversion of ``name`` (its marker file exists)."""
    source = get_source(name)
    return (Path(dest).expanduser() / source.folder / MARKER_NAME).is_file()


def fetch(name: str, dest: str | Path, base_url: str | None = None, force: bool = False,
          keep_archive: bool = False) -> Path:
    """Download (or reuse), verify, unpack and convert dataset ``name`` under ``dest``.

    Args:
        name: registry key (``mvtec``, ``visa``, ``mpdd``, ``btad``, ``dtd``).
        dest: folder for the archive and the converted dataset (created if missing).
        base_url: a mirror holding the files under their usual names: downloads
            ``<base_url>/<file name>`` instead of the official address.
        force: redo the unpacking and conversion even when a finished one is there (an archive
            already in ``dest`` is still reused after its checksum is verified).
        keep_archive: keep the archive after a successful conversion (default: delete it).

    Returns:
        The folder to pass to ``main.py`` (DATA_PATH, or AUG_PATH for ``dtd``).

    Raises:
        GlassError: offline, damaged archive, unsafe archive member, unexpected layout, ...
    """
    source = get_source(name)
    dest = Path(dest).expanduser()
    target = dest / source.folder
    result = data_path(source.name, dest)
    if (target / MARKER_NAME).is_file() and not force:
        LOGGER.info("%s already there: %s (pass --force to redo it)", source.title, result)
        return result
    if target.exists() and not force:
        raise GlassError(f"{target} exists but is not a finished conversion by this tool (no {MARKER_NAME}): "
                         f"move it away or pass --force to replace it")
    _ensure_writable_dir(dest)

    archive = dest / source.file_name
    if archive.is_file():
        LOGGER.info("using %s already in %s (no download)", source.file_name, dest)
        digest = _verify_local(archive, source.archive)
    else:
        digest = _obtain(source.archive, archive, base_url, manual=source.manual, homepage=source.homepage)

    scratch = dest / f".{source.name}.unpacking"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        unpack(archive, scratch / "raw")
        converted = CONVERTERS[source.name](scratch / "raw", scratch / "out", source, dest, base_url)
        _write_marker(converted, source, archive, digest)
        if target.exists():
            shutil.rmtree(target)
        os.replace(converted, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not keep_archive:
        archive.unlink()
        LOGGER.info("removed %s (pass --keep-archive to keep it)", archive)
    LOGGER.info("%s ready at %s", source.title, result)
    return result


# --------------------------------------------------------------------------------------------------
# Download and checksums


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, digest = checksum.partition(":")
    return algorithm, digest


def _bar(total: int | None, desc: str) -> tqdm:
    """A byte progress bar on stderr; works without a terminal (plain carriage-return updates)."""
    return tqdm(total=total or None, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, mininterval=0.5, dynamic_ncols=True, leave=True)


def hash_file(path: Path, algorithm: str = "sha256", desc: str | None = None) -> str:
    """Hex digest of ``path`` (with a progress bar)."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle, _bar(path.stat().st_size, desc or f"checking {path.name}") as bar:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            hasher.update(chunk)
            bar.update(len(chunk))
    return hasher.hexdigest()


def _verify_local(path: Path, spec: DataFile) -> str:
    """Check a file that is already on disk; returns its recorded digest ("algo:hex")."""
    if spec.checksum is None:
        digest = hash_file(path, "sha256")
        _warn_unverified(path, digest)
        return f"sha256:{digest}"
    algorithm, expected = _parse_checksum(spec.checksum)
    digest = hash_file(path, algorithm)
    if digest != expected:
        raise GlassError(f"{path} is damaged or not the official file ({algorithm} {digest}, expected {expected}): "
                         f"delete it and run this command again")
    LOGGER.info("%s: %s checksum OK", path.name, algorithm)
    return spec.checksum


def _warn_unverified(path: Path, sha256: str) -> None:
    LOGGER.warning("could not verify %s: no published checksum; its sha256 is %s (compare it with a trusted "
                   "copy)", path.name, sha256)


def _candidate_urls(spec: DataFile, base_url: str | None) -> tuple[str, ...]:
    if base_url:
        return (f"{base_url.rstrip('/')}/{spec.file_name}",)
    return spec.urls


def _by_hand(url: str, spec: DataFile, path: Path) -> str:
    return f"download {spec.file_name} by hand from {url} and put it at {path}, then run this command again"


def _obtain(spec: DataFile, path: Path, base_url: str | None, manual: bool = False, homepage: str = "") -> str:
    """Download ``spec`` to ``path`` unless it is a manual-only file; returns "algo:hex"."""
    if manual and not base_url:
        raise GlassError(f"{spec.file_name} has no direct download link: open {spec.urls[0]} (see {homepage}), "
                         f"download the whole folder as a zip and put it at {path}, then run this command again")
    return download(spec, path, base_url)


def download(spec: DataFile, path: Path, base_url: str | None = None) -> str:
    """Download ``spec`` to ``path`` with a progress bar, verifying its checksum; returns "algo:hex".

    The data goes to ``<path>.part`` first and is renamed only once the checksum matches.
    """
    urls = _candidate_urls(spec, base_url)
    failures: list[str] = []
    for url in urls:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            failures.append(f"HTTP {exc.code} {exc.reason}")
            exc.close()
            continue
        except (urllib.error.URLError, OSError) as exc:
            failures.append(_reason(exc))
            continue
        LOGGER.info("downloading %s from %s", spec.file_name, url)
        with response:
            return _receive(response, url, spec, path)
    reason = "; ".join(dict.fromkeys(failures))
    raise GlassError(f"could not reach {urls[0]} ({reason}): {_by_hand(urls[0], spec, path)}")


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, socket.gaierror):
        return f"name lookup failed: {reason.strerror or reason}"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    return str(reason).replace("\n", " ") or type(reason).__name__


def _receive(response, url: str, spec: DataFile, path: Path) -> str:
    algorithm, expected = _parse_checksum(spec.checksum) if spec.checksum else ("sha256", None)
    hasher = hashlib.new(algorithm)
    part = path.with_name(path.name + ".part")
    size = int(response.headers.get("Content-Length") or 0)
    received = 0
    try:
        with open(part, "wb") as out, _bar(size, f"downloading {spec.file_name}") as bar:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if size and received != size:
            raise GlassError(f"download of {url} stopped after {received} of {size} bytes: run this command again; "
                             f"if that fails too, {_by_hand(url, spec, path)}")
    except (OSError, urllib.error.URLError) as exc:
        part.unlink(missing_ok=True)
        raise GlassError(f"download of {url} broke off ({_reason(exc)}): run this command again; if that fails "
                         f"too, {_by_hand(url, spec, path)}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    digest = hasher.hexdigest()
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        raise GlassError(f"{spec.file_name} downloaded from {url} is damaged or has changed ({algorithm} {digest}, "
                         f"expected {expected}): run this command again; if that fails too, "
                         f"{_by_hand(url, spec, path)}")
    os.replace(part, path)
    if expected is None:
        _warn_unverified(path, digest)
    else:
        LOGGER.info("%s: %s checksum OK", spec.file_name, algorithm)
    return f"{algorithm}:{digest}"


# --------------------------------------------------------------------------------------------------
# Safe unpacking


def _safe_relpath(name: str, archive: Path) -> PurePosixPath | None:
    """The member's path relative to the output folder; GlassError for absolute or '..' paths."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in posix.split("/"):
        raise GlassError(f"{archive.name} contains an unsafe member {name!r} (absolute path or '..'): refusing to "
                         f"unpack it; delete {archive} and download it again from the official source")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


class _CountingReader:
    """File wrapper that advances a progress bar by the bytes read (compressed bytes for tar)."""

    def __init__(self, handle: BinaryIO, bar: tqdm) -> None:
        self._handle = handle
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._bar.update(len(data))
        return data


def _write_member(source: BinaryIO, out_path: Path, bar: tqdm | None = None) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as out:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            out.write(chunk)
            if bar is not None:
                bar.update(len(chunk))


def unpack(archive: Path, out_dir: Path) -> None:
    """Unpack a .tar(.gz/.xz/.bz2) or .zip into ``out_dir`` with a progress bar.

    Every member name is checked first-hand: absolute paths and '..' are refused (GlassError); links
    and device files are skipped; files are written by this function, never by ``extractall``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".zip"):
        _unpack_zip(archive, out_dir)
    elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")):
        _unpack_tar(archive, out_dir)
    else:
        raise GlassError(f"do not know how to unpack {archive.name}: expected a .tar(.gz/.xz) or .zip archive")


def _unpack_tar(archive: Path, out_dir: Path) -> None:
    skipped = 0
    try:
        with open(archive, "rb") as raw, _bar(archive.stat().st_size, f"unpacking {archive.name}") as bar:
            with tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|*") as tar:
                for member in tar:
                    rel = _safe_relpath(member.name, archive)
                    if rel is None:
                        continue
                    if member.isdir():
                        (out_dir / rel).mkdir(parents=True, exist_ok=True)
                    elif member.isfile():
                        handle = tar.extractfile(member)
                        assert handle is not None
                        _write_member(handle, out_dir / rel)
                    else:
                        skipped += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise GlassError(f"could not unpack {archive} ({exc}): check the free space in {out_dir.parent}; if the "
                         f"archive is damaged, delete it and run this command again") from exc
    if skipped:
        LOGGER.warning("%s: skipped %d link/special member(s)", archive.name, skipped)


def _unpack_zip(archive: Path, out_dir: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            targets = [(info, _safe_relpath(info.filename, archive)) for info in infos]
            total = sum(info.file_size for info in infos)
            with _bar(total, f"unpacking {archive.name}") as bar:
                for info, rel in targets:
                    if rel is None:
                        continue
                    if info.is_dir():
                        (out_dir / rel).mkdir(parents=True, exist_ok=True)
                        continue
                    with zf.open(info) as handle:
                        _write_member(handle, out_dir / rel, bar)
    except (zipfile.BadZipFile, zlib.error, OSError) as exc:
        raise GlassError(f"could not unpack {archive} ({exc}): check the free space in {out_dir.parent}; if the "
                         f"archive is damaged, delete it and run this command again") from exc


# --------------------------------------------------------------------------------------------------
# Converters: (unpacked folder, output folder, source, DEST, base_url) -> folder that becomes the target


def _walk_dirs(root: Path, max_depth: int = 3) -> Iterator[Path]:
    """``root`` and its sub-folders, breadth first, down to ``max_depth`` (hidden ones skipped)."""
    level = [root]
    for _ in range(max_depth + 1):
        following: list[Path] = []
        for folder in level:
            yield folder
            following.extend(sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
        level = following


def _find_root(unpacked: Path, predicate: Callable[[Path], bool], what: str, source: DatasetSource) -> Path:
    for folder in _walk_dirs(unpacked):
        if predicate(folder):
            return folder
    raise GlassError(f"{source.file_name} does not look like {source.title} (no {what} found inside): delete it "
                     f"and download the official archive again")


def _class_dirs(folder: Path, normal: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "train" / normal).is_dir())


def _convert_mvtec_like(unpacked: Path, out: Path, source: DatasetSource, dest: Path, base_url: str | None) -> Path:
    """MVTec AD and MPDD already have the MVTec layout: locate the folder of classes and keep it."""
    root = _find_root(unpacked, lambda d: bool(_class_dirs(d, "good")), "<class>/train/good folder", source)
    classes = [p.name for p in _class_dirs(root, "good")]
    LOGGER.info("%s: %d classes (%s)", source.title, len(classes), ", ".join(classes))
    os.replace(root, out)
    return out


def _convert_btad(unpacked: Path, out: Path, source: DatasetSource, dest: Path, base_url: str | None) -> Path:
    """BTAD -> MVTec layout: ok -> good, masks ground_truth/ko/<stem>.<ext> -> <stem>_mask.png.

    Images keep their format (.bmp for 01 and 03, .png for 02); masks are written as PNG.
    """
    root = _find_root(unpacked, lambda d: bool(_class_dirs(d, "ok")), "<class>/train/ok folder", source)
    out.mkdir(parents=True)
    for class_dir in _class_dirs(root, "ok"):
        missing = 0
        for split in ("train", "test"):
            if not (class_dir / split).is_dir():
                continue
            for label_dir in sorted(p for p in (class_dir / split).iterdir() if p.is_dir()):
                label = "good" if label_dir.name == "ok" else label_dir.name
                target_dir = out / class_dir.name / split / label
                target_dir.mkdir(parents=True, exist_ok=True)
                for image in sorted(label_dir.iterdir()):
                    if image.is_file():
                        os.replace(image, target_dir / image.name)
        gt_root = class_dir / "ground_truth"
        if gt_root.is_dir():
            for label_dir in sorted(p for p in gt_root.iterdir() if p.is_dir() and p.name != "ok"):
                target_dir = out / class_dir.name / "ground_truth" / label_dir.name
                target_dir.mkdir(parents=True, exist_ok=True)
                for mask in sorted(label_dir.iterdir()):
                    if mask.is_file() and is_image(mask.name):
                        _move_as_png(mask, target_dir / f"{mask.stem}_mask.png")
        for label_dir in sorted((out / class_dir.name / "test").glob("*")):
            if label_dir.name == "good":
                continue
            for image in label_dir.iterdir():
                if not (out / class_dir.name / "ground_truth" / label_dir.name / f"{image.stem}_mask.png").is_file():
                    missing += 1
        if missing:
            LOGGER.warning("BTAD class %s: %d defective test image(s) without a mask", class_dir.name, missing)
    LOGGER.info("%s: classes %s converted to the MVTec layout", source.title,
                ", ".join(p.name for p in sorted(out.iterdir())))
    return out


def _move_as_png(src: Path, dst: Path) -> None:
    if src.suffix.lower() == ".png":
        os.replace(src, dst)
        return
    from PIL import Image  # only needed for non-PNG masks

    with Image.open(src) as image:
        image.save(dst)
    src.unlink()


def _convert_visa(unpacked: Path, out: Path, source: DatasetSource, dest: Path, base_url: str | None) -> Path:
    """VisA keeps its original layout; makes sure ``split_csv/1cls.csv`` is there."""
    def looks_like_visa(folder: Path) -> bool:
        return (folder / "split_csv" / "1cls.csv").is_file() or any((folder / c).is_dir() for c in VISA_CLASSES)

    root = _find_root(unpacked, looks_like_visa, "VisA class folder or split_csv/1cls.csv", source)
    split_file = root / "split_csv" / "1cls.csv"
    if not split_file.is_file():
        spec = source.extras[0]
        local = dest / spec.file_name
        if local.is_file():
            LOGGER.info("the archive has no split_csv/1cls.csv: using %s", local)
            _verify_local(local, spec)
        else:
            LOGGER.info("the archive has no split_csv/1cls.csv: fetching the official split")
            try:
                download(spec, local, base_url)
            except GlassError as exc:
                raise GlassError(f"{source.file_name} has no split_csv/1cls.csv and the official split could not be "
                                 f"fetched ({exc})") from None
        split_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, split_file)
    _check_visa_split(split_file, root, source)
    os.replace(root, out)
    return out


def _check_visa_split(split_file: Path, root: Path, source: DatasetSource) -> None:
    with open(split_file, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise GlassError(f"{split_file} is not the VisA split file (expected columns {', '.join(sorted(needed))}): "
                         f"download split_csv/1cls.csv from {source.homepage} and put it at {split_file}")
    missing = [row["image"] for row in rows if not (root / row["image"]).is_file()]
    if missing:
        LOGGER.warning("%d of %d images listed in 1cls.csv are missing (first: %s)", len(missing), len(rows),
                       missing[0])
    LOGGER.info("%s: %d rows in split_csv/1cls.csv, objects %s", source.title, len(rows),
                ", ".join(sorted({row["object"] for row in rows})))


def _convert_dtd(unpacked: Path, out: Path, source: DatasetSource, dest: Path, base_url: str | None) -> Path:
    """DTD: locate the folder holding ``images/<category>/*.jpg`` and keep it as ``dtd``."""
    def has_images(folder: Path) -> bool:
        images = folder / "images"
        return images.is_dir() and any(images.glob("*/*.jpg"))

    root = _find_root(unpacked, has_images, "images/<category>/*.jpg", source)
    categories = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    LOGGER.info("%s: %d categories", source.title, len(categories))
    os.replace(root, out)
    return out


CONVERTERS: dict[str, Callable[[Path, Path, DatasetSource, Path, str | None], Path]] = {
    "mvtec": _convert_mvtec_like,
    "mpdd": _convert_mvtec_like,
    "btad": _convert_btad,
    "visa": _convert_visa,
    "dtd": _convert_dtd,
}


# --------------------------------------------------------------------------------------------------
# Bookkeeping


def _ensure_writable_dir(dest: Path) -> None:
    try:
        make_writable_folder(str(dest))
    except OSError as exc:
        raise GlassError(f"cannot write to {dest} ({exc.strerror or exc}): choose a writable DEST") from None


def _write_marker(folder: Path, source: DatasetSource, archive: Path, digest: str) -> None:
    record = {
        "dataset": source.name,
        "title": source.title,
        "archive": archive.name,
        "checksum": digest,
        "verified": source.checksum is not None,
        "data_subpath": source.data_subpath,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MARKER_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Command line


@click.command(help="Download dataset NAME into DEST, verify its checksum, unpack it and convert it to the "
                    "layout main.py reads. Offline, it says which file to download by hand and where to put it.")
@click.argument("name", type=click.Choice(sorted(DATASETS), case_sensitive=False))
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="redo the unpacking and conversion even if a finished one is there")
@click.option("--base-url", default=None, metavar="URL",
              help="download <URL>/<file name> instead of the official address (a mirror)")
@click.option("--keep-archive", is_flag=True, help="keep the downloaded archive after converting it")
def cli(name: str, dest: Path, force: bool, base_url: str | None, keep_archive: bool) -> None:
    """Fetch one dataset and print the folder to pass to main.py."""
    name = name.lower()
    try:
        already = is_fetched(name, dest) and not force
        path = fetch(name, dest, base_url=base_url, force=force, keep_archive=keep_archive)
    except GlassError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    title = DATASETS[name].title
    if already:
        click.echo(f"{title} already there: {path} (pass --force to redo it)")
    else:
        click.echo(f"{title} ready: {path}")
    role = "AUG_PATH" if name == "dtd" else "DATA_PATH"
    click.echo(f"  pass it to main.py as {role}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``python -m datasets.fetch NAME DEST [options]``) and return its exit status."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="python -m datasets.fetch",
                 standalone_mode=False)
    except click.UsageError as exc:  # one line for the mistake, one for where to look (as main.py)
        click.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
        click.echo("Try 'python -m datasets.fetch --help' for help.", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    sys.exit(main())

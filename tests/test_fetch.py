"""Dataset fetcher: download from a local HTTP server, verify, unpack safely, convert, rerun, fail in one line.

Every test talks only to 127.0.0.1: a ``http.server`` in a thread serves tiny archives built here, and
``base_url`` points the fetcher at it (``<base_url>/<file name>``). The registry's checksums are pinned
to the tiny archives' real digests with ``monkeypatch``.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import http.server
import io
import json
import socket
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from datasets import fetch
from utils import GlassError


# --------------------------------------------------------------------------------------------------
# Tiny archives and a local server


def image_bytes(fmt: str, value: int = 128, mode: str = "RGB", size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 255 - value)).save(buffer, format=fmt)
    return buffer.getvalue()


def make_tar(path: Path, files: dict[str, bytes], mode: str) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


MVTEC_FILES = {  # like the real archive: class folders at the top, no wrapping folder
    "license.txt": b"CC BY-NC-SA 4.0\n",
    "bottle/train/good/000.png": image_bytes("PNG", 10),
    "bottle/train/good/001.png": image_bytes("PNG", 20),
    "bottle/test/good/000.png": image_bytes("PNG", 30),
    "bottle/test/broken_large/000.png": image_bytes("PNG", 40),
    "bottle/ground_truth/broken_large/000_mask.png": image_bytes("PNG", 255, mode="L"),
}

BTAD_FILES = {  # wrapped in BTech_Dataset_transformed/, ok/ko labels, masks named like their image
    "BTech_Dataset_transformed/01/train/ok/0000.bmp": image_bytes("BMP", 1),
    "BTech_Dataset_transformed/01/test/ok/0000.bmp": image_bytes("BMP", 2),
    "BTech_Dataset_transformed/01/test/ko/0001.bmp": image_bytes("BMP", 3),
    "BTech_Dataset_transformed/01/ground_truth/ko/0001.png": image_bytes("PNG", 255, mode="L"),
    "BTech_Dataset_transformed/02/train/ok/0000.png": image_bytes("PNG", 4),
    "BTech_Dataset_transformed/02/test/ok/0000.png": image_bytes("PNG", 5),
    "BTech_Dataset_transformed/02/test/ko/0007.png": image_bytes("PNG", 6),
    "BTech_Dataset_transformed/02/ground_truth/ko/0007.bmp": image_bytes("BMP", 255, mode="L"),
}

DTD_FILES = {
    "dtd/images/banded/banded_0001.jpg": image_bytes("JPEG", 50),
    "dtd/images/dotted/dotted_0001.jpg": image_bytes("JPEG", 60),
    "dtd/labels/labels_joint_anno.txt": b"banded/banded_0001.jpg banded\n",
}


def visa_split_csv() -> bytes:
    rows = [
        ["object", "split", "label", "image", "mask"],
        ["candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""],
        ["candle", "test", "normal", "candle/Data/Images/Normal/0001.JPG", ""],
        ["candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"],
    ]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode()


VISA_IMAGES = {
    "candle/image_anno.csv": b"image,label,mask\n",
    "candle/Data/Images/Normal/0000.JPG": image_bytes("JPEG", 70),
    "candle/Data/Images/Normal/0001.JPG": image_bytes("JPEG", 80),
    "candle/Data/Images/Anomaly/000.JPG": image_bytes("JPEG", 90),
    "candle/Data/Masks/Anomaly/000.png": image_bytes("PNG", 1, mode="L"),
}


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(served folder, http://127.0.0.1:PORT, request log) for a thread-run static file server."""
    root = tmp_path_factory.mktemp("served")
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", handler.requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def mirror(server, request):
    """A fresh folder on the server for one test: (folder, base_url, request log)."""
    root, url, log = server
    sub = root / request.node.name.replace("[", "_").replace("]", "_")
    sub.mkdir()
    return sub, f"{url}/{sub.name}", log


def pin(monkeypatch, name: str, archive: Path | None, algorithm: str = "sha256") -> str | None:
    """Make the registry expect ``archive``'s real digest (None: no published checksum)."""
    checksum = None if archive is None else f"{algorithm}:{hashlib.new(algorithm, archive.read_bytes()).hexdigest()}"
    source = fetch.DATASETS[name]
    monkeypatch.setitem(fetch.DATASETS, name,
                        dataclasses.replace(source, archive=dataclasses.replace(source.archive, checksum=checksum)))
    return checksum


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def relative_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------
# The registry


def test_registry_lists_the_five_datasets_with_official_sources() -> None:
    assert set(fetch.DATASETS) == {"mvtec", "visa", "mpdd", "btad", "dtd"}
    for name, source in fetch.DATASETS.items():
        assert source.name == name
        assert all(url.startswith("https://") for url in source.urls)
        if not source.manual:
            assert all(url.rsplit("/", 1)[1] == source.file_name for url in source.urls)
        if source.checksum is not None:
            algorithm, digest = source.checksum.split(":")
            assert len(digest) == {"sha256": 64, "md5": 32}[algorithm]
    assert fetch.DATASETS["mpdd"].manual and fetch.DATASETS["mpdd"].checksum is None
    with pytest.raises(ValueError):
        fetch.DataFile("x.tar", ("https://example.org/x.tar",), checksum="sha256:1234")


# --------------------------------------------------------------------------------------------------
# Download, unpack, convert


def test_mvtec_download_unpack_and_rerun_is_idempotent(tmp_path, mirror, monkeypatch, capsys) -> None:
    served, base_url, log = mirror
    archive = make_tar(served / "mvtec_anomaly_detection.tar.xz", MVTEC_FILES, "w:xz")
    pin(monkeypatch, "mvtec", archive)
    dest = tmp_path / "data"

    path = fetch.fetch("mvtec", dest, base_url=base_url)

    assert path == dest / "mvtec_anomaly_detection" == fetch.data_path("mvtec", dest)
    assert relative_files(path) == set(MVTEC_FILES) | {fetch.MARKER_NAME}
    assert (path / "bottle/test/broken_large/000.png").read_bytes() == MVTEC_FILES["bottle/test/broken_large/000.png"]
    assert fetch.is_fetched("mvtec", dest)
    assert not (dest / archive.name).exists(), "the archive is removed unless --keep-archive"
    assert sorted(p.name for p in dest.iterdir()) == ["mvtec_anomaly_detection"], "no scratch or .part left"
    err = capsys.readouterr().err  # progress bars on a non-TTY stderr: no crash, plain updates
    assert "downloading mvtec_anomaly_detection.tar.xz" in err and "unpacking" in err

    n_requests = len(log)
    assert fetch.fetch("mvtec", dest, base_url=base_url) == path
    assert len(log) == n_requests, "a finished conversion is not downloaded again"

    (path / "bottle/train/good/000.png").unlink()
    assert fetch.fetch("mvtec", dest, base_url=base_url, force=True) == path
    assert (path / "bottle/train/good/000.png").is_file(), "--force redoes the conversion"


def test_btad_zip_is_converted_to_mvtec_layout(tmp_path, mirror, monkeypatch) -> None:
    served, base_url, _ = mirror
    archive = make_zip(served / "btad.zip", BTAD_FILES)
    pin(monkeypatch, "btad", archive)
    dest = tmp_path / "data"

    path = fetch.fetch("btad", dest, base_url=base_url, keep_archive=True)

    assert path == dest / "btad"
    assert relative_files(path) == {
        "01/train/good/0000.bmp", "01/test/good/0000.bmp", "01/test/ko/0001.bmp", "01/ground_truth/ko/0001_mask.png",
        "02/train/good/0000.png", "02/test/good/0000.png", "02/test/ko/0007.png", "02/ground_truth/ko/0007_mask.png",
        fetch.MARKER_NAME,
    }
    with Image.open(path / "02/ground_truth/ko/0007_mask.png") as mask:  # a .bmp mask becomes a real PNG
        assert mask.format == "PNG" and mask.size == (8, 6)
    assert (dest / "btad.zip").read_bytes() == archive.read_bytes(), "--keep-archive keeps it"
    assert json.loads((path / fetch.MARKER_NAME).read_text())["verified"] is True


def test_btad_defective_image_without_mask_is_reported(tmp_path, mirror, monkeypatch, caplog) -> None:
    served, base_url, _ = mirror
    files = {**BTAD_FILES, "BTech_Dataset_transformed/01/test/ko/0002.bmp": image_bytes("BMP", 7)}
    pin(monkeypatch, "btad", make_zip(served / "btad.zip", files))

    with caplog.at_level("WARNING", logger="datasets.fetch"):
        path = fetch.fetch("btad", tmp_path, base_url=base_url)

    assert (path / "01/test/ko/0002.bmp").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["BTAD class 01: 1 defective test image(s) without a mask"]


def test_dtd_tar_gz_gives_images_folder(tmp_path, mirror, monkeypatch) -> None:
    served, base_url, _ = mirror
    archive = make_tar(served / "dtd-r1.0.1.tar.gz", DTD_FILES, "w:gz")
    pin(monkeypatch, "dtd", archive, algorithm="md5")

    path = fetch.fetch("dtd", tmp_path, base_url=base_url)

    assert path == tmp_path / "dtd" / "images"
    assert sorted(p.relative_to(path).as_posix() for p in path.glob("*/*.jpg")) == [
        "banded/banded_0001.jpg", "dotted/dotted_0001.jpg"]
    assert (tmp_path / "dtd" / "labels" / "labels_joint_anno.txt").is_file()


def test_visa_keeps_original_layout_and_split_csv(tmp_path, mirror, monkeypatch) -> None:
    served, base_url, _ = mirror
    files = {**VISA_IMAGES, "split_csv/1cls.csv": visa_split_csv()}
    archive = make_tar(served / "VisA_20220922.tar", files, "w")
    pin(monkeypatch, "visa", archive)

    path = fetch.fetch("visa", tmp_path, base_url=base_url)

    assert path == tmp_path / "VisA_20220922"
    assert relative_files(path) == set(files) | {fetch.MARKER_NAME}


def test_visa_without_split_csv_gets_the_official_one(tmp_path, mirror, monkeypatch, caplog) -> None:
    served, base_url, _ = mirror
    archive = make_tar(served / "VisA_20220922.tar", {f"VisA/{k}": v for k, v in VISA_IMAGES.items()}, "w")
    (served / "1cls.csv").write_bytes(visa_split_csv())
    pin(monkeypatch, "visa", archive)

    with caplog.at_level("WARNING", logger="datasets.fetch"):
        path = fetch.fetch("visa", tmp_path, base_url=base_url)

    assert (path / "split_csv" / "1cls.csv").read_bytes() == visa_split_csv()
    assert (path / "candle/Data/Masks/Anomaly/000.png").is_file()
    sha = hashlib.sha256(visa_split_csv()).hexdigest()
    assert any(sha in record.getMessage() and "could not verify" in record.getMessage() for record in caplog.records)


def test_unverifiable_archive_prints_its_sha256(tmp_path, mirror, monkeypatch, caplog) -> None:
    """MPDD has no published checksum (and no direct link: a mirror via base_url works)."""
    served, base_url, _ = mirror
    archive = make_zip(served / "MPDD.zip", {f"MPDD/{k}": v for k, v in MVTEC_FILES.items()})
    assert pin(monkeypatch, "mpdd", None) is None

    with caplog.at_level("WARNING", logger="datasets.fetch"):
        path = fetch.fetch("mpdd", tmp_path, base_url=base_url)

    assert (path / "bottle" / "ground_truth" / "broken_large" / "000_mask.png").is_file()
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("could not verify MPDD.zip" in w and sha in w for w in warnings), warnings
    assert json.loads((tmp_path / "mpdd" / fetch.MARKER_NAME).read_text())["verified"] is False


def test_mirror_address_with_a_trailing_slash() -> None:
    spec = fetch.get_source("dtd").archive
    assert fetch._candidate_urls(spec, "http://127.0.0.1:8000/data/") == (f"http://127.0.0.1:8000/data/{spec.file_name}",)
    assert fetch._candidate_urls(spec, None) == spec.urls


class _ShortResponse:
    """An HTTP response that announces 100 bytes and ends after 60."""

    headers = {"Content-Length": "100"}

    def __init__(self) -> None:
        self.body = io.BytesIO(b"x" * 60)

    def read(self, size: int = -1) -> bytes:
        return self.body.read(size)


def test_download_that_ends_early_is_an_error_and_leaves_nothing(tmp_path) -> None:
    spec = fetch.DataFile("f.tar", ("http://127.0.0.1/f.tar",))  # no checksum: only the length can tell
    with pytest.raises(GlassError, match="stopped after 60 of 100 bytes"):
        fetch._receive(_ShortResponse(), spec.urls[0], spec, tmp_path / "f.tar")
    assert list(tmp_path.iterdir()) == []


def test_links_in_a_tar_are_skipped(tmp_path, caplog) -> None:
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"texture"
        info = tarfile.TarInfo("dtd/images/banded/banded_0001.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, kind in (("dtd/images/banded/soft.jpg", tarfile.SYMTYPE), ("dtd/images/banded/hard.jpg", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "dtd/images/banded/banded_0001.jpg"
            tar.addfile(link)
    with caplog.at_level("WARNING", logger="datasets.fetch"):
        fetch.unpack(archive, tmp_path / "out")
    assert relative_files(tmp_path / "out") == {"dtd/images/banded/banded_0001.jpg"}
    assert "a.tar: skipped 2 link/special member(s)" in caplog.text


def test_archive_already_in_dest_is_used_without_download(tmp_path, monkeypatch) -> None:
    archive = make_tar(tmp_path / "dtd-r1.0.1.tar.gz", DTD_FILES, "w:gz")
    pin(monkeypatch, "dtd", archive)

    path = fetch.fetch("dtd", tmp_path, base_url=closed_port_url())  # would fail if it tried to download

    assert (path / "banded" / "banded_0001.jpg").is_file()


# --------------------------------------------------------------------------------------------------
# Failures: one line, saying what to do


def test_damaged_archive_in_dest_is_reported(tmp_path, monkeypatch) -> None:
    good = make_tar(tmp_path / "good.tar.gz", DTD_FILES, "w:gz")
    pin(monkeypatch, "dtd", good)
    (tmp_path / "dtd-r1.0.1.tar.gz").write_bytes(good.read_bytes()[:-10])

    with pytest.raises(GlassError) as excinfo:
        fetch.fetch("dtd", tmp_path, base_url=closed_port_url())

    message = str(excinfo.value)
    assert "\n" not in message
    assert "damaged" in message and "delete it" in message and "dtd-r1.0.1.tar.gz" in message
    assert not (tmp_path / "dtd").exists()


def test_downloaded_checksum_mismatch_leaves_nothing(tmp_path, mirror, monkeypatch) -> None:
    served, base_url, _ = mirror
    make_tar(served / "mvtec_anomaly_detection.tar.xz", MVTEC_FILES, "w:xz")
    source = fetch.DATASETS["mvtec"]
    monkeypatch.setitem(fetch.DATASETS, "mvtec", dataclasses.replace(
        source, archive=dataclasses.replace(source.archive, checksum="md5:" + "0" * 32)))

    with pytest.raises(GlassError) as excinfo:
        fetch.fetch("mvtec", tmp_path, base_url=base_url)

    message = str(excinfo.value)
    assert "\n" not in message and "damaged" in message and "0" * 32 in message
    assert list(tmp_path.iterdir()) == [], "neither the file nor its .part stays behind"


def test_offline_says_what_to_download_and_where(tmp_path) -> None:
    url = closed_port_url()

    with pytest.raises(GlassError) as excinfo:
        fetch.fetch("mvtec", tmp_path, base_url=url)

    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"could not reach {url}/mvtec_anomaly_detection.tar.xz (connection refused)")
    assert f"put it at {tmp_path / 'mvtec_anomaly_detection.tar.xz'}" in message
    assert "by hand" in message and "run this command again" in message


def test_mpdd_without_archive_gives_manual_instructions(tmp_path) -> None:
    with pytest.raises(GlassError) as excinfo:
        fetch.fetch("mpdd", tmp_path)  # manual-only: no network access is attempted

    message = str(excinfo.value)
    assert "\n" not in message
    assert "sharepoint.com" in message and str(tmp_path / "MPDD.zip") in message


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize("evil", ["../evil.txt", "ABSOLUTE", "dtd/../../evil.txt"])
def test_unsafe_member_is_refused(tmp_path, monkeypatch, kind: str, evil: str) -> None:
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    if evil == "ABSOLUTE":
        evil = (tmp_path / "evil_absolute.txt").as_posix()
    files = {**DTD_FILES, evil: b"pwned"}
    if kind == "tar":
        archive = make_tar(dest / "dtd-r1.0.1.tar.gz", files, "w:gz")
        pin(monkeypatch, "dtd", archive)
    else:
        archive = make_zip(dest / "dtd.zip", files)
        source = fetch.DATASETS["dtd"]
        monkeypatch.setitem(fetch.DATASETS, "dtd", dataclasses.replace(
            source, archive=dataclasses.replace(source.archive, file_name="dtd.zip")))
        pin(monkeypatch, "dtd", archive)

    with pytest.raises(GlassError) as excinfo:
        fetch.fetch("dtd", dest, base_url=closed_port_url())

    message = str(excinfo.value)
    assert "\n" not in message and "unsafe member" in message and evil in message
    assert not list(tmp_path.rglob("evil*")), "nothing is written outside (or inside) DEST"
    assert not (dest / "dtd").exists()


def test_existing_foreign_folder_is_not_overwritten(tmp_path) -> None:
    (tmp_path / "btad" / "mine").mkdir(parents=True)

    with pytest.raises(GlassError, match="--force"):
        fetch.fetch("btad", tmp_path, base_url=closed_port_url())

    assert (tmp_path / "btad" / "mine").is_dir()


def test_unwritable_dest_is_one_clear_error(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")

    with pytest.raises(GlassError, match=r"cannot write to .*a_file/data \(Not a directory\): choose a writable DEST"):
        fetch.fetch("btad", blocker / "data", base_url=closed_port_url())

    assert blocker.read_text() == "not a folder"


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_offline_exits_2_with_one_line(tmp_path) -> None:
    result = CliRunner().invoke(fetch.cli, ["btad", str(tmp_path), "--base-url", closed_port_url()])

    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: could not reach ")
    assert "btad.zip" in lines[0]


def test_cli_fetches_then_says_already_there(tmp_path, mirror, monkeypatch) -> None:
    served, base_url, _ = mirror
    archive = make_tar(served / "dtd-r1.0.1.tar.gz", DTD_FILES, "w:gz")
    pin(monkeypatch, "dtd", archive)
    runner = CliRunner()

    first = runner.invoke(fetch.cli, ["dtd", str(tmp_path), "--base-url", base_url, "--keep-archive"])
    assert first.exit_code == 0, first.output
    assert f"ready: {tmp_path / 'dtd' / 'images'}" in first.stdout and "AUG_PATH" in first.stdout
    assert (tmp_path / "dtd-r1.0.1.tar.gz").is_file()

    again = runner.invoke(fetch.cli, ["DTD", str(tmp_path), "--base-url", closed_port_url()])
    assert again.exit_code == 0, again.output
    assert "already there" in again.stdout


def test_main_returns_exit_status(tmp_path, capsys) -> None:
    assert fetch.main(["mvtec", str(tmp_path), "--base-url", closed_port_url()]) == 2
    assert fetch.main(["--help"]) == 0
    capsys.readouterr()
    assert fetch.main(["mvtek", str(tmp_path)]) == 2  # a usage mistake: the error line, then where to look
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Error: ") and "'mvtek' is not one of" in lines[0]
    assert lines[1] == "Try 'python -m datasets.fetch --help' for help."

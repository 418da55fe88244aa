"""Shared fixtures: where the real test data lives (../shared/data beside the project)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = Path(os.environ.get("GLASS_SHARED_DATA", ROOT.parent / "shared" / "data"))
MVTEC3D = SHARED_DATA / "mvtec3d"
MAGNETIC = SHARED_DATA / "magnetic_tile"
DTD = SHARED_DATA / "dtd" / "images"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"real test data not found at {SHARED_DATA}: put ../shared beside the project"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tire_root(shared_data) -> Path:
    """MVTec-layout root holding the class folder `tire`."""
    return MVTEC3D


@pytest.fixture(scope="session")
def dtd_root(shared_data) -> Path:
    """DTD `images/` folder: `<category>/*.jpg`."""
    return DTD


# --------------------------------------------------------------------------------------------------
# A tiny real-data profile shared by the end-to-end tests: a subset of MVTec 3D-AD `tire` (copied to a
# temporary folder at test time), EfficientNet-Lite0 at 64 px, 128-d embeddings, few steps.

TINY_NET = [
    "net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4",
    "--pretrain_embed_dimension", "128", "--target_embed_dimension", "128", "--dsc_hidden", "128",
    "--meta_epochs", "2", "--step", "3", "--limit", "16",
]


def tiny_dataset_args(data_root, aug_root, classes=("tire",), extra=()):
    """`dataset` arguments of the tiny profile (manifold hypothesis, no foreground masks, 64 px)."""
    flags = [arg for name in classes for arg in ("-d", name)]
    return ["dataset", "--distribution", "2", "--fg", "0", "--resize", "64", "--imagesize", "64",
            "--num_workers", "0", "--batch_size", "8", *extra, *flags, "mvtec", str(data_root), str(aug_root)]


def copy_class_subset(source_class: Path, dest_class: Path, n_train=40, n_good=6, n_per_defect=3) -> Path:
    """Copy part of an MVTec-layout class folder (images and their masks) to ``dest_class``."""
    import shutil

    def copy(src: Path, dst: Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)

    for path in sorted((source_class / "train" / "good").iterdir())[:n_train]:
        copy(path, dest_class / "train" / "good" / path.name)
    for defect_dir in sorted((source_class / "test").iterdir()):
        count = n_good if defect_dir.name == "good" else n_per_defect
        for path in sorted(defect_dir.iterdir())[:count]:
            copy(path, dest_class / "test" / defect_dir.name / path.name)
            if defect_dir.name != "good":
                mask = source_class / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
                copy(mask, dest_class / "ground_truth" / defect_dir.name / mask.name)
    return dest_class


@pytest.fixture(scope="session")
def tiny_tire(tmp_path_factory, tire_root) -> Path:
    """MVTec-layout root with a small `tire` class (40 train, 6 good + 12 defective test images)."""
    root = tmp_path_factory.mktemp("tiny_tire")
    copy_class_subset(tire_root / "tire", root / "tire")
    return root


def awkward_inputs(image: Path, root: Path) -> tuple:
    """An input folder for predict and ort.py holding ``image`` twice, under a name that is not valid UTF-8 (cv2.imwrite
    crashed the process on it) and under one whose heatmap name is too long for a file name, with a link back up
    the tree (each image was found dozens of times). Returns (folder, the two image paths)."""
    import shutil

    inputs = root / "in"
    (inputs / "deep").mkdir(parents=True)
    not_utf8, long_name = inputs / os.fsdecode(b"caf\xe9.png"), inputs / "deep" / ("x" * 250 + ".png")
    for path in (not_utf8, long_name):
        shutil.copy(image, path)
    (inputs / "deep" / "up").symlink_to(inputs, target_is_directory=True)
    return inputs, not_utf8, long_name


def run_main(args) -> int:
    """Run the CLI in this process (as `python main.py ARGS`); returns its exit code."""
    import main

    return main.cli([str(a) for a in args])


@pytest.fixture(scope="session")
def trained_tire(tmp_path_factory, tiny_tire, dtd_root) -> Path:
    """Results folder of one tiny training run on `tire` (train, then test the best checkpoint)."""
    results = tmp_path_factory.mktemp("trained_tire")
    code = run_main(["--results_path", results, *TINY_NET, *tiny_dataset_args(tiny_tire, dtd_root)])
    assert code == 0
    return results

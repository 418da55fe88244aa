"""Every dataset layout on real images: VisA, MVTec 3D-AD, MVTec LOCO, BTAD, custom data without masks or
with some masks, through the loaders and one short train -> test run each; the layout check; class lists.

Each dataset is a small copy (16 training, 8 test images) of MVTec 3D-AD `tire` or Magnetic-tile images,
renamed and re-encoded into the dataset's own layout.
"""
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision import transforms

import glass
from conftest import DTD, MAGNETIC, MVTEC3D, ROOT, TINY_NET, copy_class_subset, run_main, tiny_dataset_args
from datasets import LOADERS, loader_class
from datasets.base import AnomalyDataset, DatasetSplit, load_image
from datasets.btad import BTADDataset
from datasets.loco import LOCODataset
from datasets.mvtec import MVTecDataset
from datasets.mvtec3d import MVTec3DDataset
from datasets.visa import VisADataset
from utils import GlassError

TIRE = MVTEC3D / "tire"
TILE = MAGNETIC / "magnetic_tile"
SIZE = 64
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_pro")


def first(folder: Path, count: int, start: int = 0):
    return sorted(folder.iterdir())[start:start + count]


def save(src: Path, dst: Path, values=None) -> Path:
    """Copy ``src`` to ``dst`` (re-encoded when the extension differs; masks 0/255 -> ``values`` if given)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if values is not None:
        mask = np.asarray(PIL.Image.open(src).convert("L")) > 0
        PIL.Image.fromarray(np.where(mask, values, 0).astype(np.uint8)).save(dst)
    elif src.suffix.lower() == dst.suffix.lower():
        shutil.copyfile(src, dst)
    else:
        PIL.Image.open(src).convert("RGB").save(dst)
    return dst


def tire_mask(kind: str, image: Path) -> Path:
    return TIRE / "ground_truth" / kind / f"{image.stem}_mask.png"


def run_tiny(results: Path, root: Path, name: str, classname: str) -> int:
    """One tiny train -> test run (1 epoch) of dataset ``name`` through the CLI."""
    net = list(TINY_NET)
    net[net.index("--meta_epochs") + 1] = "1"
    data = tiny_dataset_args(root, DTD, classes=(classname,))
    data[-3] = name
    return run_main(["--results_path", results, *net, *data])


def read_results(results: Path):
    with open(results / "results.csv") as handle:
        return list(csv.DictReader(handle))


def assert_full_row(results: Path, row_name: str):
    rows = read_results(results)
    assert [row["Row Names"] for row in rows] == [row_name, "Mean"]
    for key in ("image_auroc", "image_ap", *PIXEL_KEYS):
        assert 0.0 <= float(rows[0][key]) <= 1.0
    return rows


# --------------------------------------------------------------------------------------------------
# Builders: one small class in each dataset's own layout

def build_visa(root: Path, n_train=16, n_good=4) -> Path:
    """VisA: `candle/Data/Images/{Normal,Anomaly}/*.JPG`, integer-label masks, `split_csv/1cls.csv`."""
    rows = [("object", "split", "label", "image", "mask")]
    data = root / "candle" / "Data"
    for i, src in enumerate(first(TIRE / "train" / "good", n_train + n_good)):
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        save(src, root / rel)
        rows.append(("candle", "train" if i < n_train else "test", "normal", rel, ""))
    defects = [(kind, p) for kind in ("cut", "hole") for p in first(TIRE / "test" / kind, 2)]
    for j, (kind, src) in enumerate(defects):
        rel, rel_mask = f"candle/Data/Images/Anomaly/{j:03d}.JPG", f"candle/Data/Masks/Anomaly/{j:03d}.png"
        save(src, root / rel)
        save(tire_mask(kind, src), root / rel_mask, values=j % 3 + 1)  # small integer labels, as VisA's
        rows.append(("candle", "test", "anomaly", rel, rel_mask))
    rows.append(("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""))  # another class: ignored
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert data.is_dir()
    return root


def build_mvtec3d(root: Path) -> Path:
    """MVTec 3D-AD: `tire/{train,validation}/good/rgb`, `tire/test/<type>/{rgb,gt}`."""
    cls = root / "tire"
    for src in first(TIRE / "train" / "good", 16):
        save(src, cls / "train" / "good" / "rgb" / src.name)
    save(first(TIRE / "train" / "good", 1, start=30)[0], cls / "validation" / "good" / "rgb" / "000.png")
    (cls / "test" / "good" / "gt").mkdir(parents=True)
    for src in first(TIRE / "test" / "good", 4):
        save(src, cls / "test" / "good" / "rgb" / src.name)
        PIL.Image.new("L", PIL.Image.open(src).size).save(cls / "test" / "good" / "gt" / src.name)  # all normal
    for kind in ("cut", "hole"):
        for src in first(TIRE / "test" / kind, 2):
            save(src, cls / "test" / kind / "rgb" / src.name)
            save(tire_mask(kind, src), cls / "test" / kind / "gt" / src.name)
    return root


def build_loco(root: Path) -> Path:
    """MVTec LOCO: masks as `ground_truth/<type>/<stem>/000.png, 001.png` (two halves of one defect)."""
    cls = root / "juice_bottle"
    for src in first(TIRE / "train" / "good", 16):
        save(src, cls / "train" / "good" / src.name)
    save(first(TIRE / "train" / "good", 1, start=30)[0], cls / "validation" / "good" / "000.png")
    for src in first(TIRE / "test" / "good", 4):
        save(src, cls / "test" / "good" / src.name)
    for kind, tire_kind in (("logical_anomalies", "hole"), ("structural_anomalies", "cut")):
        for src in first(TIRE / "test" / tire_kind, 2):
            save(src, cls / "test" / kind / src.name)
            mask = np.asarray(PIL.Image.open(tire_mask(tire_kind, src))) > 0
            top, bottom = mask.copy(), mask.copy()
            top[mask.shape[0] // 2:] = False
            bottom[: mask.shape[0] // 2] = False
            folder = cls / "ground_truth" / kind / src.stem
            folder.mkdir(parents=True)
            PIL.Image.fromarray(top.astype(np.uint8) * 255).save(folder / "000.png")
            PIL.Image.fromarray(bottom.astype(np.uint8) * 7).save(folder / "001.png")  # any non-zero value
    return root


def build_btad(root: Path) -> Path:
    """BTAD as published: `01/train/ok/*.bmp`, `01/test/{ok,ko}/*.bmp`, `01/ground_truth/ko/*.png`."""
    cls = root / "01"
    for i, src in enumerate(first(TILE / "train" / "good", 16)):
        save(src, cls / "train" / "ok" / f"{i:04d}.bmp")
    for i, src in enumerate(first(TILE / "test" / "good", 4)):
        save(src, cls / "test" / "ok" / f"{i:04d}.bmp")
    for i, src in enumerate(first(TILE / "test" / "uneven", 2) + first(TILE / "test" / "fray", 2, start=2)):
        save(src, cls / "test" / "ko" / f"{i:04d}.bmp")
        kind = src.parent.name
        save(TILE / "ground_truth" / kind / f"{src.stem}_mask.png", cls / "ground_truth" / "ko" / f"{i:04d}.png")
    return root


@pytest.fixture()
def custom_part(tmp_path) -> Path:
    """A custom class `part` in MVTec AD layout: 16 training images, 4 good and 8 defective test images."""
    root = tmp_path / "data"
    copy_class_subset(TIRE, root / "part", n_train=16, n_good=4, n_per_defect=2)
    return root


# --------------------------------------------------------------------------------------------------
# Loaders

def test_visa_items_follow_the_split_file(tmp_path):
    root = build_visa(tmp_path / "visa")
    train = VisADataset(root, DTD, classname="candle", resize=SIZE, imagesize=SIZE)
    assert len(train) == 16 and {row[1] for row in train.data_to_iterate} == {"normal"}
    np.random.seed(0)
    torch.manual_seed(0)
    item = train[0]
    assert item["aug"].shape == (3, SIZE, SIZE) and item["mask_s"].max() == 1 and item["is_anomaly"] == 0
    test = VisADataset(root, DTD, classname="candle", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    assert [row[1] for row in test.data_to_iterate] == ["anomaly"] * 4 + ["normal"] * 4  # anomalies first
    for i in range(len(test)):
        item = test[i]
        values = set(item["mask_gt"].unique().tolist())
        assert item["is_anomaly"] == int(i < 4)
        assert values == ({0.0, 1.0} if i < 4 else {0.0})  # labels 1..3 binarised, after the resize too


def test_visa_masks_are_resized_as_floats_then_binarised_as_the_reference(tmp_path):
    root = build_visa(tmp_path / "visa")
    # One defect pixel in a VisA-sized mask: after an 8-bit resize its faintest edge weights round to 0.
    image, mask = root / "candle/Data/Images/Anomaly/000.JPG", root / "candle/Data/Masks/Anomaly/000.png"
    PIL.Image.open(image).convert("RGB").resize((1300, 1000)).save(image)
    pixels = np.zeros((1000, 1300), np.uint8)
    pixels[500, 650] = 1
    PIL.Image.fromarray(pixels).save(mask)
    test = VisADataset(root, DTD, classname="candle", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    resize = transforms.Compose([transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.ToTensor()])
    for i in range(4):  # the anomalies: the reference opens the mask as 'F', resizes it and keeps > 0
        expected = (resize(PIL.Image.open(test.data_to_iterate[i][3]).convert("F")) > 0).to(torch.float32)
        assert torch.equal(test[i]["mask_gt"], expected)
    eight_bit = resize(PIL.Image.fromarray(pixels * 255)) > 0
    assert test[0]["mask_gt"].sum() > eight_bit.sum() > 0


def test_visa_trains_and_tests(tmp_path):
    results = tmp_path / "results"
    assert run_tiny(results, build_visa(tmp_path / "visa"), "visa", "candle") == 0
    assert_full_row(results, "visa_candle")
    assert list((results / "models" / "backbone_0" / "visa_candle").glob("ckpt_best_*.pth"))


def test_mvtec3d_reads_rgb_and_gt_subfolders(tmp_path):
    root = build_mvtec3d(tmp_path / "mvtec3d")
    train = MVTec3DDataset(root, DTD, dataset_name="mvtec3d", classname="tire", resize=SIZE, imagesize=SIZE)
    assert len(train) == 16 and all("/train/good/rgb/" in row[2] for row in train.data_to_iterate)
    test = MVTec3DDataset(root, DTD, dataset_name="mvtec3d", classname="tire", resize=SIZE, imagesize=SIZE,
                          split=DatasetSplit.TEST)
    masks = {row[2]: row[3] for row in test.data_to_iterate}
    assert len(masks) == 8
    for image, mask in masks.items():
        assert mask is None if "/good/" in image else mask == image.replace("/rgb/", "/gt/")
    # The same images in MVTec AD layout (the shared `tire`) read the same way.
    flat = MVTec3DDataset(MVTEC3D, DTD, classname="tire", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    assert len(flat) == 112 and flat.unknown_masks == 0
    results = tmp_path / "results"
    assert run_tiny(results, root, "mvtec3d", "tire") == 0
    assert_full_row(results, "mvtec3d_tire")


def test_loco_unites_the_masks_of_an_image(tmp_path):
    root = build_loco(tmp_path / "loco")
    test = LOCODataset(root, DTD, dataset_name="loco", classname="juice_bottle", resize=SIZE, imagesize=SIZE,
                       split=DatasetSplit.TEST)
    kinds = [row[1] for row in test.data_to_iterate]
    assert kinds == ["good"] * 4 + ["logical_anomalies"] * 2 + ["structural_anomalies"] * 2
    reference = MVTecDataset(MVTEC3D, DTD, classname="tire", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    for i in (4, 6):
        _, kind, image, mask = test.data_to_iterate[i]
        assert len(mask) == 2 and mask[0].endswith(f"{Path(image).stem}/000.png")
        tire_kind = "hole" if kind == "logical_anomalies" else "cut"
        original = reference.transform_mask(PIL.Image.open(tire_mask(tire_kind, Path(image))).convert("L"))
        assert torch.equal(test[i]["mask_gt"], original)  # the union is the whole defect
    results = tmp_path / "results"
    assert run_tiny(results, root, "loco", "juice_bottle") == 0
    assert_full_row(results, "loco_juice_bottle")


def test_btad_original_layout_with_bmp_images(tmp_path):
    root = build_btad(tmp_path / "btad")
    test = BTADDataset(root, DTD, dataset_name="btad", classname="01", resize=SIZE, imagesize=SIZE,
                       split=DatasetSplit.TEST)
    assert [row[1] for row in test.data_to_iterate] == ["ko"] * 4 + ["good"] * 4  # ok images are the normal ones
    assert all(row[3].endswith(Path(row[2]).stem + ".png") for row in test.data_to_iterate[:4])
    assert [test[i]["is_anomaly"] for i in (0, 7)] == [1, 0]
    results = tmp_path / "results"
    assert run_tiny(results, root, "btad", "01") == 0
    assert_full_row(results, "btad_01")


def test_btad_converted_layout(custom_part):
    """The MVTec AD layout that `datasets.fetch btad` writes (`good`, `<stem>_mask.png`)."""
    data = BTADDataset(custom_part, DTD, dataset_name="btad", classname="part", resize=SIZE, imagesize=SIZE,
                       split=DatasetSplit.TEST)
    assert len(data) == 12 and data.unknown_masks == 0


# --------------------------------------------------------------------------------------------------
# No masks, some masks

def test_custom_data_without_masks_reports_pixel_metrics_as_not_available(custom_part, tmp_path, capsys):
    shutil.rmtree(custom_part / "part" / "ground_truth")
    results = tmp_path / "results"
    assert run_tiny(results, custom_part, "custom", "part") == 0
    rows = read_results(results)
    assert [row["Row Names"] for row in rows] == ["custom_part", "Mean"]
    for row in rows:
        assert 0.0 <= float(row["image_auroc"]) <= 1.0
        assert [row[key] for key in PIXEL_KEYS] == ["", "", ""]
    out = capsys.readouterr().out
    assert re.search(r"custom_part: image_auroc:\d+\.\d\d image_ap:\d+\.\d\d "
                     r"pixel_auroc:n/a pixel_ap:n/a pixel_pro:n/a", out)
    assert len(list((results / "eval" / "custom_part").glob("*.png"))) == 12
    tb = EventAccumulator(str(results / "models" / "backbone_0" / "custom_part" / "tb")).Reload()
    assert np.isnan(tb.Scalars("p-auroc")[0].value) and np.isfinite(tb.Scalars("i-auroc")[0].value)


def test_masks_thinner_than_a_resized_pixel_leave_pixel_metrics_out_and_say_why(custom_part, tmp_path, caplog):
    for path in (custom_part / "part" / "ground_truth").rglob("*.png"):  # one-pixel lines, as thin cracks
        mask = np.zeros_like(np.asarray(PIL.Image.open(path).convert("L")))
        mask[:, mask.shape[1] // 2] = 255
        PIL.Image.fromarray(mask).save(path)
    results = tmp_path / "results"
    with caplog.at_level("WARNING"):
        assert run_tiny(results, custom_part, "custom", "part") == 0
    assert [read_results(results)[0][key] for key in PIXEL_KEYS] == ["", "", ""]
    assert "custom_part: no pixel of the resized masks is fully defective (largest value 0." in caplog.text


def test_partial_masks_score_pixels_of_the_known_images(custom_part, tmp_path, caplog):
    gt = custom_part / "part" / "ground_truth"
    for name in ("cut/000_mask.png", "hole/001_mask.png", "combined/000_mask.png"):
        (gt / name).unlink()
    results = tmp_path / "results"
    with caplog.at_level("WARNING"):
        assert run_tiny(results, custom_part, "custom", "part") == 0
    assert "3 of 8 defect test images have no mask" in caplog.text
    assert_full_row(results, "custom_part")


def test_evaluate_leaves_unknown_ground_truth_out_of_pixel_metrics():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 16, 16))
    masks = np.zeros((6, 1, 16, 16), np.float32)
    masks[3:, 0, 4:9, 4:9] = 1
    maps[3:, 4:9, 4:9] += 0.5
    scores, labels = maps.max(axis=(1, 2)), np.array([0, 0, 0, 1, 1, 1])
    known = glass.GLASS._evaluate(None, scores[:5], maps[:5], labels[:5], masks[:5], path="eval")
    masks[5] = np.nan  # the sixth image's mask is unknown
    partial = glass.GLASS._evaluate(None, scores, maps, labels, masks, path="eval")
    assert partial[2:] == known[2:]
    masks[3:] = np.nan
    assert np.isnan(glass.GLASS._evaluate(None, scores, maps, labels, masks, path="eval")[2:]).all()


def test_evaluate_reports_pixel_metrics_as_not_available_when_no_mask_pixel_is_fully_defective():
    # Resized masks keep fractional values: only pixels at exactly 1 count as defective (as the reference).
    rng = np.random.default_rng(0)
    maps = rng.random((2, 8, 8))
    masks = np.zeros((2, 1, 8, 8), np.float32)
    masks[1, 0, 2:4, 2:4] = 0.5
    result = glass.GLASS._evaluate(None, [0.1, 0.9], maps, [0, 1], masks, path="eval")
    assert result[:2] == [1.0, 1.0] and np.isnan(result[2:]).all()
    masks[1, 0, 2, 2] = 1.0  # one pixel is: the pixel metrics exist
    assert not np.isnan(glass.GLASS._evaluate(None, [0.1, 0.9], maps, [0, 1], masks, path="eval")[2:]).any()


# --------------------------------------------------------------------------------------------------
# Layout check

def test_every_layout_problem_is_reported_at_once(custom_part, capsys):
    cls = custom_part / "part"
    (cls / "train" / "good" / "003.png").write_bytes(b"not an image")
    mask = cls / "ground_truth" / "cut" / "001_mask.png"
    PIL.Image.open(mask).resize((100, 50)).save(mask)
    for path in (cls / "ground_truth" / "hole").iterdir():
        path.rename(path.with_name("defect_" + path.name))
    shutil.rmtree(cls / "test" / "good")
    code = run_tiny(custom_part.parent / "results", custom_part, "custom", "part")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"Error: MVTec AD layout problems in {custom_part} (class part): ")
    assert "1 unreadable image (part/train/good/003.png; replace or remove them)" in err  # training split
    assert "1 mask of another size than its image (part/ground_truth/cut/001_mask.png 100x50 vs 320x427)" in err
    assert "1 mask folder matching no image (part/ground_truth/hole" in err
    assert "1 test split without normal images" in err
    assert not (custom_part.parent / "results" / "models").exists()  # nothing trained


def test_layout_problems_of_several_classes_are_reported_together(custom_part, capsys):
    shutil.copytree(custom_part / "part", custom_part / "part2")
    (custom_part / "part" / "train" / "good" / "003.png").write_bytes(b"not an image")
    shutil.rmtree(custom_part / "part2" / "test" / "good")
    net = list(TINY_NET)
    net[net.index("--meta_epochs") + 1] = "1"
    data = tiny_dataset_args(custom_part, DTD, classes=("part", "part2"))
    data[-3] = "custom"
    code = run_main(["--results_path", custom_part.parent / "results", *net, *data])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "(class part): 1 unreadable image (part/train/good/003.png" in err
    assert " | MVTec AD layout problems in " in err and "(class part2): 1 test split without normal images" in err
    assert not (custom_part.parent / "results" / "models").exists()  # neither class trained


def test_hidden_files_and_folders_are_not_images_or_classes(custom_part, tmp_path):
    # macOS's AppleDouble files (._name.png) and tools' hidden folders sit beside real images when a dataset
    # was copied from a Mac or opened in Jupyter; the reference's texture glob skips them too.
    junk = b"\x00\x05\x16\x07 AppleDouble"
    (custom_part / "part" / "train" / "good" / "._000.png").write_bytes(junk)
    (custom_part / "part" / "test" / ".ipynb_checkpoints").mkdir()
    (custom_part / "part" / "test" / ".ipynb_checkpoints" / "000.png").write_bytes(junk)
    textures = tmp_path / "dtd"
    for category in ("banded", ".cache"):
        for source in first(DTD / "banded", 2):
            save(source, textures / category / source.name)
    (textures / "banded" / "._x.jpg").write_bytes(junk)
    train = MVTecDataset(custom_part, textures, classname="part", resize=SIZE, imagesize=SIZE)
    test = MVTecDataset(custom_part, textures, classname="part", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    assert len(train) == 16 and len(test) == 12
    assert train.anomaly_source_paths == [str(textures / "banded" / p.name) for p in first(DTD / "banded", 2)]
    assert {row[1] for row in test.data_to_iterate} == {"good", "cut", "hole", "combined", "contamination"}


def test_empty_test_folders_are_skipped_with_a_warning(custom_part, caplog):
    part = custom_part / "part"
    (part / "test" / "scratch").mkdir()
    mask = next((part / "ground_truth" / "cut").iterdir())
    save(mask, part / "ground_truth" / "scratch" / mask.name)
    (part / "test" / "stain").mkdir()
    test = MVTecDataset(custom_part, DTD, classname="part", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    assert len(test) == 12
    assert {row[1] for row in test.data_to_iterate} == {"good", "cut", "hole", "combined", "contamination"}
    assert "part: part/test/scratch, part/test/stain without images, skipped (with their masks, if any)" in caplog.text


def test_missing_folders_and_foreground_masks(tmp_path):
    cls = tmp_path / "part"
    (cls / "train" / "bad").mkdir(parents=True)
    with pytest.raises(GlassError) as error:
        MVTecDataset(tmp_path, DTD, classname="part", fg=1)
    assert "1 missing training folder (part/train/good; put the defect-free training images there)" in str(error.value)
    with pytest.raises(GlassError, match=r"1 missing folder \(part/test;"):
        MVTecDataset(tmp_path, DTD, classname="part", split=DatasetSplit.TEST)
    save(first(TIRE / "train" / "good", 1)[0], cls / "train" / "good" / "000.png")
    with pytest.raises(GlassError, match=r"1 missing or unreadable foreground mask \(fg_mask/part/000.png; .*--fg 0\)"):
        MVTecDataset(tmp_path, DTD, classname="part", fg=1)
    # A foreground mask is resized and cropped as its image is: of another size, it would not cover the object.
    (tmp_path / "fg_mask" / "part").mkdir(parents=True)
    width, height = PIL.Image.open(cls / "train" / "good" / "000.png").size
    PIL.Image.new("L", (50, 50), 255).save(tmp_path / "fg_mask" / "part" / "000.png")
    with pytest.raises(GlassError, match=rf"1 foreground mask of another size than its image \(fg_mask/part/000.png "
                                         rf"50x50 vs {width}x{height}; they are resized and cropped"):
        MVTecDataset(tmp_path, DTD, classname="part", fg=1)
    PIL.Image.new("L", (width, height), 255).save(tmp_path / "fg_mask" / "part" / "000.png")
    assert MVTecDataset(tmp_path, DTD, classname="part", fg=1).class_fg == 1


def test_broken_links_to_images_and_masks_are_named(tmp_path):
    cls = tmp_path / "part"
    for i, path in enumerate(first(TIRE / "train" / "good", 2)):
        save(path, cls / "train" / "good" / f"{i:03d}.png")
    (cls / "train" / "good" / "002.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(GlassError, match=r"1 image that is a broken link \(part/train/good/002.png; the link points to "
                                         r".*gone.png, which does not exist: fix or remove it\)"):
        MVTecDataset(tmp_path, DTD, classname="part")
    save(first(TIRE / "test" / "good", 1)[0], cls / "test" / "good" / "000.png")
    cut = sorted((TIRE / "test" / "cut").iterdir())[0]
    save(cut, cls / "test" / "cut" / "000.png")
    (cls / "ground_truth" / "cut").mkdir(parents=True)
    (cls / "ground_truth" / "cut" / "000_mask.png").symlink_to(tmp_path / "gone_mask.png")
    with pytest.raises(GlassError, match=r"1 mask that is a broken link \(part/ground_truth/cut/000_mask.png; the link"):
        MVTecDataset(tmp_path, DTD, classname="part", split=DatasetSplit.TEST)
    # A defect type's folder that is a link to nowhere: left out silently, its images would change the metrics.
    (cls / "ground_truth" / "cut" / "000_mask.png").unlink()
    save(sorted((TIRE / "ground_truth" / "cut").iterdir())[0], cls / "ground_truth" / "cut" / "000_mask.png")
    (cls / "test" / "hole").symlink_to(tmp_path / "moved" / "hole")
    with pytest.raises(GlassError, match=r"1 folder that is a broken link \(part/test/hole; fix the links or remove them\)"):
        MVTecDataset(tmp_path, DTD, classname="part", split=DatasetSplit.TEST)


def test_files_directly_in_a_split_folder_are_named_as_left_out(tmp_path, caplog):
    cls = tmp_path / "part"
    for i, path in enumerate(first(TIRE / "train" / "good", 2)):
        save(path, cls / "train" / "good" / f"{i:03d}.png")
    save(first(TIRE / "train" / "good", 1, start=2)[0], cls / "train" / "002.png")  # not in train/good
    (cls / "train" / ".DS_Store").write_bytes(b"\0")  # hidden: not named
    assert len(MVTecDataset(tmp_path, DTD, classname="part")) == 2
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning == ("part: 1 file(s) left out, directly in part/train and not in one of its <good|defect type> "
                       "folders: part/train/002.png")


def test_data_of_another_layout_or_a_class_folder_gets_the_right_hint(tmp_path):
    mvtec3d, loco = build_mvtec3d(tmp_path / "mvtec3d"), build_loco(tmp_path / "loco")
    with pytest.raises(GlassError) as error:  # MVTec 3D-AD data named mvtec
        MVTecDataset(mvtec3d, DTD, classname="tire")
    assert "1 folder with its images in rgb/ (tire/train/good; that is the MVTec 3D-AD layout: use the dataset " \
           "name mvtec3d)" in str(error.value) and "without images" not in str(error.value)
    with pytest.raises(GlassError) as error:
        MVTecDataset(mvtec3d, DTD, classname="tire", split=DatasetSplit.TEST)
    assert "folders with their images in rgb/" in str(error.value) and "without images" not in str(error.value)
    with pytest.raises(GlassError) as error:  # MVTec LOCO AD data named mvtec: its masks would be lost
        MVTecDataset(loco, DTD, classname="juice_bottle", split=DatasetSplit.TEST)
    assert "2 mask folders of folders (juice_bottle/ground_truth/logical_anomalies, " \
           "juice_bottle/ground_truth/structural_anomalies; a folder of masks per image is the MVTec LOCO AD layout: " \
           "use the dataset name loco)" in str(error.value)
    for class_folder in (str(mvtec3d / "tire"), str(mvtec3d / "tire") + "/"):  # a class folder given as DATA_PATH
        with pytest.raises(GlassError) as error:
            MVTecDataset(class_folder, DTD, classname="tire")
        assert str(error.value).endswith("looks like a class folder itself (train/, test/): give its parent folder "
                                         "as DATA_PATH and -d tire")


def test_images_of_more_than_8_bits_are_read_as_the_reference_reads_them_with_a_warning(tmp_path, caplog):
    root = tmp_path / "data"
    copy_class_subset(TIRE, root / "part", n_train=3, n_good=1, n_per_defect=1)
    wide = sorted((root / "part" / "train" / "good").iterdir())[0]
    gray = np.asarray(PIL.Image.open(wide).convert("L")).astype(np.uint16) * 257  # the same picture in 16 bits
    PIL.Image.fromarray(gray).save(wide)
    assert PIL.Image.open(wide).mode == "I;16"
    with caplog.at_level("WARNING"):
        MVTecDataset(root, DTD, classname="part", resize=SIZE, imagesize=SIZE)
    assert f"1 mvtec_part train image(s) of more than 8 bits per pixel (part/train/good/{wide.name}): read as the " \
           "reference reads images" in caplog.text
    # As the reference's PIL conversion: values above 255 clip, so every pixel but the black ones turns white ...
    assert (np.asarray(load_image(str(wide))) == 255).mean() > 0.9
    assert "(16-bit images turn mostly white, 0..1 float ones black)" in caplog.text
    # ... and fractions truncate, so a float image of values in 0..1 turns black.
    floats = root / "floats.tiff"
    PIL.Image.fromarray((gray / 65535).astype(np.float32), mode="F").save(floats)
    assert np.asarray(load_image(str(floats))).max() <= 1


def test_visa_split_file_naming_missing_files(tmp_path):
    root = build_visa(tmp_path / "visa")
    (root / "candle" / "Data" / "Images" / "Normal" / "0017.JPG").unlink()
    (root / "candle" / "Data" / "Masks" / "Anomaly" / "002.png").unlink()
    with pytest.raises(GlassError) as error:
        VisADataset(root, DTD, classname="candle", split=DatasetSplit.TEST)
    message = str(error.value)
    assert "1 missing image (candle/Data/Images/Normal/0017.JPG)" in message
    assert "1 missing mask (candle/Data/Masks/Anomaly/002.png)" in message
    with pytest.raises(GlassError, match="'pcb4' not found .*available classes are candle, pcb1"):
        VisADataset(root, DTD, classname="pcb4")
    split = root / "split_csv" / "1cls.csv"
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes())  # saved by Excel: a byte-order mark first
    assert len(VisADataset(root, DTD, classname="candle")) == 16
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(GlassError, match="split_csv/1cls.csv is missing"):
        VisADataset(root, DTD, classname="candle")


# --------------------------------------------------------------------------------------------------
# Names, class lists and scripts

SCRIPTS = {"mvtec": "run-mvtec.sh", "visa": "run-visa.sh", "mpdd": "run-mpdd.sh", "wfdd": "run-wfdd.sh",
           "mad": "run-mad-man.sh", "mvtec3d": "run-mvtec3d.sh", "loco": "run-loco.sh", "btad": "run-btad.sh"}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_every_dataset_name_reaches_a_loader_with_its_classes(name):
    loader = loader_class(name)
    assert issubclass(loader, AnomalyDataset)
    assert name in loader.CLASSNAMES
    if name in SCRIPTS:
        script = (ROOT / "shell" / SCRIPTS[name]).read_text()
        classes = re.search(r'CLASSES=\$\{CLASSES:-"([^"]*)"\}', script).group(1).split()
        assert tuple(classes) == loader.CLASSNAMES[name]


def test_every_script_names_a_known_dataset():
    scripts = [path for path in ROOT.glob("shell/run-*.sh") if path.name != "run-demo.sh"]
    assert len(scripts) == 10
    for script in scripts:
        used = re.search(r"\) (\w+) \"\$DATAPATH\"", script.read_text())
        assert used is not None and used.group(1) in LOADERS, script.name


DATA_SCRIPTS = sorted(path.name for path in (ROOT / "shell").glob("run-*.sh") if path.name != "run-demo.sh")


def run_script(name: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"shell/{name}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.parametrize("script", DATA_SCRIPTS)
def test_a_script_without_its_data_says_which_variable_to_set(script, tmp_path):
    missing = run_script(script, DATAPATH=str(tmp_path / "nowhere"), AUGPATH=str(DTD))
    no_textures = run_script(script, DATAPATH=str(tmp_path), AUGPATH=str(tmp_path / "no_dtd"))
    for done, variable in ((missing, "DATAPATH"), (no_textures, "AUGPATH")):
        assert done.returncode == 2 and done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {variable}=") and f"bash shell/{script}" in lines[0]


def test_a_script_with_its_folders_hands_them_to_main(tmp_path):
    """Existing folders pass the script's check; main.py then checks the classes in them."""
    done = run_script("run-custom.sh", DATAPATH=str(tmp_path), AUGPATH=str(DTD), CLASSES="part_a", GPU="-1",
                      RESULTS=str(tmp_path / "results"))
    assert done.returncode == 2
    assert "part_a" in done.stderr.splitlines()[-1] and done.stderr.splitlines()[-1].startswith("Error: ")


def test_mad_sys_script_tests_the_five_texture_classes_as_the_reference():
    script = (ROOT / "shell" / "run-mad-sys.sh").read_text()
    classes = re.search(r'CLASSES=\$\{CLASSES:-"([^"]*)"\}', script).group(1).split()
    assert classes == ["carpet", "grid", "leather", "tile", "wood"]
    assert "MAD-sys/Beta_0.1}" in script


def test_visa_classes_agree_with_the_downloader():
    from datasets import fetch, visa

    assert tuple(fetch.VISA_CLASSES) == visa.VISA_CLASSES


def test_script_paths_are_relative_to_the_callers_folder(tmp_path):
    """DATAPATH, AUGPATH, RESULTS, DEMO_DIR and PYTHON given relative to where the script is run; defaults stay the repository's."""
    (tmp_path / "ok").mkdir()
    (tmp_path / "dtd").symlink_to(DTD)
    stub = tmp_path / "fake_python"  # records its folder and arguments instead of training
    stub.write_text('#!/bin/sh\necho "cwd=$PWD"\nfor arg in "$@"; do echo "$arg"; done\n')
    stub.chmod(0o755)

    def run(script: str, **env: str) -> list:
        done = subprocess.run(["bash", str(ROOT / "shell" / script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHON": "./fake_python", **env})
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    args = run("run-custom.sh", DATAPATH="ok", AUGPATH="./dtd", RESULTS="myres", CLASSES="part_a")
    assert args[0] == f"cwd={ROOT}"
    assert args[args.index("--results_path") + 1] == str(tmp_path / "myres")
    assert args[-3:] == ["mvtec", str(tmp_path / "ok"), str(tmp_path / "dtd")]  # the reference custom script's name
    args = run("run-custom.sh", DATAPATH=str(tmp_path / "ok"), AUGPATH=str(DTD), CLASSES="part_a")
    assert args[args.index("--results_path") + 1] == "results"  # the default: <repository>/results
    assert args[args.index("--meta_epochs") + 1] == "640" and args.index("--limit") < args.index("dataset")

    # A shorter run: EPOCHS, and options after the script's own (the last value of an option wins).
    args = run("run-mvtec.sh", DATAPATH="ok", AUGPATH="dtd", EPOCHS="2", NET_EXTRA="--limit 16 --step 5",
               DATASET_EXTRA="--resize 128 --imagesize 128", CLASSES="bottle")
    net, dataset = args[:args.index("dataset")], args[args.index("dataset"):]
    assert net[net.index("--meta_epochs") + 1] == "2" and net[-4:] == ["--limit", "16", "--step", "5"]
    assert dataset[-9:-3] == ["--resize", "128", "--imagesize", "128", "-d", "bottle"] and dataset[-3:] == ["mvtec", str(tmp_path / "ok"), str(tmp_path / "dtd")]

    args = run("run-demo.sh", DEMO_DIR="demo", RESULTS="out")
    assert args[:2] == [f"cwd={ROOT}", "-m"] and args[3] == str(tmp_path / "demo")
    assert args[args.index("--results_path") + 1] == str(tmp_path / "out")
    assert args[-2:] == [str(tmp_path / "demo" / "demo"), str(tmp_path / "demo" / "textures")]

    missing = subprocess.run(["bash", str(ROOT / "shell" / "run-custom.sh")], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "DATAPATH": "nowhere", "AUGPATH": "dtd"})
    assert missing.returncode == 2 and missing.stderr.startswith(f"Error: DATAPATH={tmp_path / 'nowhere'} is not a folder")


def test_available_classes_leave_out_foreground_mask_folders(tmp_path, tire_root, dtd_root):
    from datasets.mvtec import MVTecDataset

    (tmp_path / "tire").mkdir()
    (tmp_path / "fg_mask" / "tire").mkdir(parents=True)
    with pytest.raises(GlassError, match=r"available classes are tire$"):
        MVTecDataset(tmp_path, dtd_root, dataset_name="custom", classname="bottle")


def test_masks_named_stem_mask_and_png_are_preferred(tmp_path):
    from datasets.mvtec import match_masks

    for name in ("002_mask.png", "002.png", "005_mask.bmp", "005_mask.png"):
        (tmp_path / name).write_bytes(b"")
    masks, unmatched = match_masks([str(tmp_path / "002.png"), str(tmp_path / "005.png")], str(tmp_path))
    assert masks == [str(tmp_path / "002_mask.png"), str(tmp_path / "005_mask.png")]


def test_a_visa_split_file_without_one_column_is_refused(tmp_path):
    from datasets.visa import read_split

    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,split,label,image\ncandle,train,normal,a.JPG\n")
    with pytest.raises(GlassError, match=r"lacks the column\(s\) mask: expected object, split, label, image, mask"):
        read_split(str(tmp_path))


@pytest.mark.parametrize("line, old, new, says", [
    (3, ",train,", ",tset,", "line 3: split is 'tset', not train or test"),
    (3, ",normal,", ",norml,", "line 3: label is 'norml', not normal or anomaly"),
    (26, ",train,", ",test,", None),  # another class's row may move to the test split: accepted
    (26, "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,", "pcb1,train", "line 26: the row 'pcb1,train' is cut short"),
])
def test_a_visa_split_file_row_with_a_bad_split_or_label_is_refused_naming_it(tmp_path, line, old, new, says):
    root = build_visa(tmp_path / "visa")
    split = root / "split_csv" / "1cls.csv"
    lines = split.read_text().splitlines()
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new)
    split.write_text("\n".join(lines) + "\n")
    if says is None:
        assert len(VisADataset(root, DTD, classname="candle")) == 16
        return
    with pytest.raises(GlassError) as error:  # a row left out silently would train or test on less
        VisADataset(root, DTD, classname="candle")
    assert f"{split}, {says}" in str(error.value) and "\n" not in str(error.value)


def test_a_problem_list_of_exactly_three_examples_has_no_ellipsis():
    from datasets.base import LayoutProblems

    problems = LayoutProblems("/r", "part")
    for name in ("a.png", "b.png", "c.png"):
        problems.add("unreadable image", name)
    assert "3 unreadable images (a.png, b.png, c.png)" in problems.describe()
    problems.add("unreadable image", "d.png")
    assert "4 unreadable images (a.png, b.png, c.png, ...)" in problems.describe()


def test_files_of_other_kinds_in_an_image_folder_are_named_as_left_out(tmp_path, caplog):
    root = build_mvtec3d(tmp_path / "mvtec3d")
    good = root / "tire" / "train" / "good" / "rgb"
    PIL.Image.open(first(TIRE / "train" / "good", 1, start=40)[0]).save(good / "extra.webp")
    (good / "notes.txt").write_text("taken on day 2")
    (good / ".DS_Store").write_bytes(b"\0")  # hidden: not named
    train = MVTec3DDataset(root, DTD, dataset_name="mvtec3d", classname="tire", resize=SIZE, imagesize=SIZE)
    assert len(train) == 16
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("tire: 2 file(s) left out, not of the image kinds read (.png .jpg")
    assert warning.endswith("tire/train/good/rgb/extra.webp, tire/train/good/rgb/notes.txt; convert them to PNG to use them")
    caplog.clear()  # the real MVTec 3D-AD folders hold images only
    MVTec3DDataset(MVTEC3D, DTD, classname="tire", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]

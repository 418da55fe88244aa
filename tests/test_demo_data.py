"""The offline demo dataset: MVTec layout, exact masks, determinism, DTD-like textures, skip on rebuild."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import demo

SMALL = dict(
    classes=["brick", "grass"],
    size=64,
    n_train=3,
    n_test_good=2,
    n_test_defect=5,  # every defect type once, scratch twice
    seed=0,
    texture_categories=["astronaut", "coins", "tissue"],
    n_textures=3,
)


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("demo")
    root = demo.build_demo_dataset(dest, **SMALL)
    assert root == dest / "demo"
    return dest


def test_layout_is_mvtec(built: Path) -> None:
    root = built / "demo"
    for class_name in SMALL["classes"]:
        cls = root / class_name
        assert sorted(p.name for p in cls.iterdir()) == ["ground_truth", "test", "train"]
        assert len(list((cls / "train" / "good").glob("*.png"))) == SMALL["n_train"]
        assert len(list((cls / "test" / "good").glob("*.png"))) == SMALL["n_test_good"]
        assert not (cls / "ground_truth" / "good").exists()
        defect_dirs = sorted(p.name for p in (cls / "test").iterdir() if p.name != "good")
        assert defect_dirs == sorted(demo.DEFECT_TYPES)
        assert sorted(p.name for p in (cls / "ground_truth").iterdir()) == defect_dirs
        n_defect = 0
        for kind in defect_dirs:
            images = sorted((cls / "test" / kind).glob("*.png"))
            masks = sorted((cls / "ground_truth" / kind).glob("*_mask.png"))
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
            n_defect += len(images)
            for image_path, mask_path in zip(images, masks):
                image, mask = read(image_path), read(mask_path)
                assert image.shape == (64, 64, 3) and image.dtype == np.uint8
                assert mask.shape == image.shape[:2]
                assert set(np.unique(mask)) == {0, 255}, f"{mask_path} not binary or empty"
        assert n_defect == SMALL["n_test_defect"]
        for good in (cls / "train" / "good").glob("*.png"):
            assert read(good).shape == (64, 64, 3)


def test_manifest_records_parameters(built: Path) -> None:
    manifest = json.loads((built / "demo" / "manifest.json").read_text())
    assert manifest["params"] == demo.demo_params(**SMALL)
    assert "NOT MVTec AD" in manifest["description"]


def test_defects_change_only_pixels_inside_the_mask(built: Path) -> None:
    root = built / "demo"
    photos: dict[str, np.ndarray] = {}
    for class_name in SMALL["classes"]:
        specs = demo.plan_class(class_name, SMALL["n_train"], SMALL["n_test_good"], SMALL["n_test_defect"])
        for spec in specs:
            # The builder writes exactly what render_sample draws, so the clean crop can be rebuilt.
            sample = demo.render_sample(spec, SMALL["size"], SMALL["seed"], photos)
            assert np.array_equal(read(root / spec.image_relpath), sample.image)
            if not spec.is_defect:
                assert sample.mask is None and spec.mask_relpath is None
                continue
            mask = read(root / spec.mask_relpath) > 0
            assert np.array_equal(mask, sample.mask)
            changed = np.any(sample.image != sample.clean, axis=2)
            assert not changed[~mask].any(), f"{spec.image_relpath} changed outside its mask"
            assert changed[mask].mean() >= 0.5, f"{spec.image_relpath}: mask mostly unchanged"


@pytest.mark.parametrize("kind", demo.DEFECT_TYPES)
def test_synthesize_defect_on_random_images(kind: str) -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        clean = rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
        donor = rng.integers(0, 256, size=(60, 100, 3), dtype=np.uint8)
        image, mask = demo.synthesize_defect(clean, kind, rng, patch_source=donor)
        assert mask.shape == (48, 80) and mask.dtype == bool and mask.any()
        assert np.array_equal(image[~mask], clean[~mask])


def test_defects_are_redrawn_until_large_and_visible_enough(monkeypatch) -> None:
    # A crack darkens its pixels: on a black image it can never show, which is an error, not an invisible defect.
    with pytest.raises(demo.DemoDataError, match="could not draw a visible crack defect in 20 tries"):
        demo.synthesize_defect(np.zeros((64, 64, 3), np.uint8), "crack", np.random.default_rng(0))
    # A mask below the minimum area (12 pixels here) is drawn again.
    tiny, large = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    tiny[:2, :5] = True
    large[10:20, 10:20] = True
    masks = [tiny, large]
    monkeypatch.setattr(demo, "_crack_mask", lambda size, rng: (masks.pop(0), {"strength": 0.5}))
    image, mask = demo.synthesize_defect(np.full((64, 64, 3), 200, np.uint8), "crack", np.random.default_rng(0))
    assert masks == [] and np.array_equal(mask, large) and np.all(image[large] == 100)


def test_train_and_test_crops_come_from_disjoint_rows() -> None:
    """Training crops lie in the top TRAIN_FRACTION of the photo's rows and test crops below: no test pixel is
    ever seen in training. Rows above the boundary are black, rows below white (gain and offset change them by
    at most 7 % and 6 levels)."""
    photo = np.zeros((200, 90, 3), np.uint8)
    boundary = int(round(demo.TRAIN_FRACTION * 200))
    photo[boundary:] = 255
    for seed in range(30):
        rng = np.random.default_rng(seed)
        assert demo._random_crop(photo, "train", (64, 64), rng).max() <= 6
        assert demo._random_crop(photo, "test", (64, 64), rng).min() >= 231


def test_patch_defects_come_from_another_texture() -> None:
    for class_name in demo.CLASS_SOURCES:
        donors = {demo._patch_donor(class_name, demo.SampleSpec(class_name, "test", "patch", i)) for i in range(6)}
        assert class_name not in donors and len(donors) > 1


def test_unknown_defect_is_rejected() -> None:
    with pytest.raises(demo.DemoDataError, match="unknown defect"):
        demo.synthesize_defect(np.zeros((32, 32, 3), np.uint8), "dent", np.random.default_rng(0))


def test_textures_are_dtd_layout_jpgs(built: Path) -> None:
    textures = built / "textures"
    assert sorted(p.name for p in textures.iterdir()) == sorted(SMALL["texture_categories"])
    for category in SMALL["texture_categories"]:
        files = sorted((textures / category).iterdir())
        assert [f.suffix for f in files] == [".jpg"] * SMALL["n_textures"]
        assert read(files[0]).shape == (64, 64, 3)
    # The anomaly textures come from other pictures than the classes.
    assert not set(demo.TEXTURE_SOURCES.values()) & set(demo.CLASS_SOURCES.values())


def test_same_seed_gives_identical_files(built: Path, tmp_path: Path) -> None:
    demo.build_demo_dataset(tmp_path, **SMALL)
    first = sorted(p.relative_to(built) for p in built.rglob("*") if p.suffix in {".png", ".jpg"})
    second = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.suffix in {".png", ".jpg"})
    assert first == second
    for rel in first:
        assert (built / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_other_seed_gives_other_images(built: Path, tmp_path: Path) -> None:
    demo.build_demo_dataset(tmp_path, **{**SMALL, "seed": 1, "classes": ["brick"]})
    rel = Path("demo/brick/train/good/000.png")
    assert (built / rel).read_bytes() != (tmp_path / rel).read_bytes()


def test_rebuild_is_skipped_when_complete(tmp_path: Path, monkeypatch) -> None:
    params = {**SMALL, "classes": ["brick"], "n_test_defect": 4, "texture_categories": ["coins"]}
    demo.build_demo_dataset(tmp_path, **params)
    first = tmp_path / "demo/brick/train/good/000.png"
    stamp = first.stat().st_mtime_ns

    def forbidden(*args, **kwargs):
        raise AssertionError("rebuilt a complete dataset")

    with monkeypatch.context() as patch:
        patch.setattr(demo, "render_sample", forbidden)
        demo.build_demo_dataset(tmp_path, **params)
    assert first.stat().st_mtime_ns == stamp

    # A missing file makes the build incomplete: it is rebuilt.
    (tmp_path / "demo/brick/test/spot/000.png").unlink()
    demo.build_demo_dataset(tmp_path, **params)
    assert (tmp_path / "demo/brick/test/spot/000.png").is_file()

    # Other parameters rebuild, and leave no files of the old build behind.
    demo.build_demo_dataset(tmp_path, **{**params, "n_train": 2})
    assert sorted(p.name for p in (tmp_path / "demo/brick/train/good").iterdir()) == ["000.png", "001.png"]
    manifest = json.loads((tmp_path / "demo/manifest.json").read_text())
    assert manifest["params"]["n_train"] == 2


def test_duplicate_classes_and_small_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(demo.DemoDataError, match="duplicate class"):
        demo.build_demo_dataset(tmp_path, classes=["brick", "brick"])
    for size in ("31", "32x16", 16):
        with pytest.raises(demo.DemoDataError, match="sides >= 32"):
            demo._parse_size(size)
    assert demo._parse_size("32x48") == (32, 48) and demo._parse_size(40) == (40, 40)
    assert not (tmp_path / "demo").exists()


def test_unknown_class_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(demo.DemoDataError, match="unknown class wood; choose from brick, grass, gravel"):
        demo.build_demo_dataset(tmp_path, classes=["brick", "wood"])
    assert not (tmp_path / "demo").exists()


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert demo.main([str(blocker / "sub"), "--classes", "brick", "--train", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write to") and "\n" not in err
    assert demo.main([str(tmp_path / "x"), "--classes", "stone"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown class stone; choose from brick, grass, gravel"


def test_cli_builds_then_skips(tmp_path: Path, capsys) -> None:
    args = [str(tmp_path), "--classes", "grass", "--size", "48x64", "--train", "2", "--test-good", "1",
            "--test-defect", "4", "--textures", "1"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "wrote demo dataset" in out and str(tmp_path / "demo") in out
    assert read(tmp_path / "demo/grass/test/patch/000.png").shape == (48, 64, 3)
    assert demo.main(args) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.parametrize("option, value, says", [
    ("--seed", "-1", "Invalid value for '--seed': -1 is not in the range x>=0."),  # was NumPy's ValueError traceback
    ("--test-defect", "0", "Invalid value for '--test-defect': 0 is not in the range x>=1."),  # main.py refused it
    ("--test-good", "0", "Invalid value for '--test-good': 0 is not in the range x>=1."),
])
def test_cli_refuses_values_that_build_no_usable_dataset(tmp_path: Path, capsys, option: str, value: str,
                                                          says: str) -> None:
    assert demo.main([str(tmp_path / "x"), "--classes", "brick", option, value]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"Error: {says}" and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_dataset_main_would_refuse_is_not_built(tmp_path: Path) -> None:
    """Every test split needs good and defective images (image AUROC); seeds are >= 0, as NumPy's."""
    for counts in ({"n_test_defect": 0}, {"n_test_good": 0}, {"n_textures": 0}):
        with pytest.raises(demo.DemoDataError, match="counts must be >= 1"):
            demo.build_demo_dataset(tmp_path, **{**SMALL, **counts})
    with pytest.raises(demo.DemoDataError, match="seed must be >= 0, got -1"):
        demo.build_demo_dataset(tmp_path, **{**SMALL, "seed": -1})
    assert list(tmp_path.iterdir()) == []

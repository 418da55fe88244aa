"""The distribution hypothesis: the spectrum judgement, the judged view of the images, the xlsx table and how
``--distribution`` 0-4 use it (spec "Training"; README deviations 3 and 11)."""
from __future__ import annotations

import random
import shutil

import cv2
import numpy as np
import pandas as pd
import PIL.Image
import torch
from click.testing import CliRunner

import glass
import main
import utils
from conftest import TINY_NET, tiny_dataset_args
from datasets.mvtec import DatasetSplit, MVTecDataset


def _disc_image(height: int, width: int, centres, radius: int, background: int = 120) -> np.ndarray:
    """An HWC uint8 image of grey level ``background`` with bright discs of ``radius`` at ``centres`` ((y, x))."""
    yy, xx = np.indices((height, width))
    image = np.full((height, width, 3), background, np.uint8)
    for cy, cx in centres:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 250
    return image


def test_flat_mean_image_is_manifold_and_a_centred_object_is_hypersphere(tmp_path):
    # A constant image has all its spectrum at the zero frequency: one lit point, not more than 60.
    flat = np.full((100, 100, 3), 128, np.uint8)
    assert utils.distribution_judge(flat, "flat", output_dir=str(tmp_path)) == 0
    # A bright disc on black (an object on a background) spreads its spectrum over a dense low-frequency blob.
    disc = _disc_image(289, 289, [(144, 144)], 60, background=0)
    assert utils.distribution_judge(disc, "disc", output_dir=str(tmp_path)) == 1
    # Each judgement writes the image beside its thresholded spectrum under <flag>/.
    for flag, name in ((0, "flat"), (1, "disc")):
        panel = np.asarray(PIL.Image.open(tmp_path / str(flag) / f"{name}.png"))
        assert panel.shape == (289, 2 * 289, 3)


def _synthetic_class(root, n_train: int = 6):
    """An MVTec-layout class ``wide`` of 64 x 192 images: flat in the centre, a bright disc at either end.

    Resized to a square (``--distribution 1``) the discs stay in the picture; resized by the shorter side and
    centre-cropped (the training view) only the flat middle is left."""
    image = PIL.Image.fromarray(_disc_image(64, 192, [(32, 24), (32, 168)], 18))
    for folder, count in (("train/good", n_train), ("test/good", 2)):
        (root / "wide" / folder).mkdir(parents=True)
        for i in range(count):
            image.save(root / "wide" / folder / f"{i:03d}.png")
    return root


def _judge(dataset, tmp_path) -> int:
    model = glass.GLASS(torch.device("cpu"))
    model.results_path = str(tmp_path / "results")
    loader = main.make_loader(dataset, batch_size=4, num_workers=0, shuffle=True)
    return model._judge_distribution(loader, "mvtec_wide")


def judged_from_spectrum(monkeypatch, magnitudes: dict) -> int:
    """The judgement of an image whose shifted spectrum is 1 everywhere (log magnitude 0) except at the
    (row, column) points given, with the magnitudes given: the image itself no longer matters."""
    blurs = []

    def spectrum(_):
        out = np.zeros((289, 289, 2), dtype=np.float32)
        out[:, :, 0] = 1
        for (row, col), value in magnitudes.items():
            out[row, col, 0] = value
        return out

    def blur(image, ksize):
        blurs.append(ksize)
        return image

    monkeypatch.setattr(np.fft, "fftshift", spectrum)
    monkeypatch.setattr(cv2, "blur", blur)
    flag = utils.distribution_judge(np.zeros((64, 64, 3), np.uint8), "crafted")
    assert blurs == [(39, 39)]
    return flag


def test_judgement_thresholds_the_log_magnitude_at_170(monkeypatch):
    square = [(144 + dy, 144 + dx) for dy in range(-9, 10) for dx in range(-9, 10)]  # 361 points, radius 12.7
    assert judged_from_spectrum(monkeypatch, {p: np.exp(9.0) for p in square}) == 1  # 20 ln|F| = 180
    assert judged_from_spectrum(monkeypatch, {p: np.exp(8.25) for p in square}) == 0  # 165: nothing lit


def test_judgement_needs_more_than_60_points_and_either_density(monkeypatch):
    # A centred line: L1 density 61 / (4 * 30 * 1) = 0.51, disc density about 61 / (pi 30^2) = 0.02, radius 30.
    line = {(144, col): np.exp(9.0) for col in range(114, 175)}
    assert judged_from_spectrum(monkeypatch, line) == 1
    del line[(144, 174)]  # 60 points
    assert judged_from_spectrum(monkeypatch, line) == 0


def test_an_all_dark_mean_image_is_judged_manifold(tmp_path):
    # No spectrum point above the threshold: the reference takes the maximum of an empty array (README deviation 9).
    assert utils.distribution_judge(np.zeros((64, 64, 3), np.uint8), "dark", output_dir=str(tmp_path)) == 0
    assert (tmp_path / "0" / "dark.png").is_file()


def test_judgement_sees_the_images_as_distribution_1_does_and_draws_no_random_numbers(tmp_path, dtd_root):
    root = _synthetic_class(tmp_path / "data")
    common = dict(classname="wide", resize=64, imagesize=64, fg=0, split=DatasetSplit.TRAIN)
    cropped = MVTecDataset(root, dtd_root, distribution=0, **common)
    square = MVTecDataset(root, dtd_root, distribution=1, **common)
    # The judged view of a --distribution 0 dataset is the --distribution 1 dataset's image, bit for bit.
    for i in range(len(cropped)):
        assert torch.equal(cropped.judge_view()[i]["image"], square[i]["image"])
    assert not torch.equal(cropped.plain_image(0), square.plain_image(0))
    # The crop alone is flat (manifold); the judgement sees the discs (hypersphere) whichever mode asked.
    flat = utils.torch_format_2_numpy_img(cropped.plain_image(0).numpy())
    assert utils.distribution_judge(flat, "crop") == 0

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert _judge(cropped, tmp_path) == 1
    assert _judge(square, tmp_path) == 1
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert (tmp_path / "results" / "judge" / "avg" / "1" / "mvtec_wide.png").is_file()


def _run(args) -> str:
    result = CliRunner().invoke(main.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _checkpoint(results) -> dict:
    return torch.load(results / "models" / "backbone_0" / "mvtec_tire" / "ckpt.pth", weights_only=True)


def _table(results) -> pd.DataFrame:
    return pd.read_excel(results / "datasets" / "excel" / "mvtec_distribution.xlsx")


def test_judge_only_then_the_table_decides_and_a_missing_class_is_judged_and_trained_alike(tmp_path, tiny_tire, dtd_root):
    net = [*TINY_NET[:TINY_NET.index("--meta_epochs")], "--meta_epochs", "1", "--step", "2", "--limit", "8"]

    def dataset(distribution: str):
        args = tiny_dataset_args(tiny_tire, dtd_root)
        args[args.index("--distribution") + 1] = distribution
        return args

    # --distribution 1: judge, record (Class, Distribution, Foreground) and train nothing.
    judged = tmp_path / "judged"
    said = _run(["--results_path", str(judged), "--gpu", "-1", *net, *dataset("1")])
    table = _table(judged)
    assert list(table.columns) == ["Class", "Distribution", "Foreground"]
    assert list(table["Class"]) == ["mvtec_tire"]
    flag = int(table["Distribution"][0])
    assert int(table["Foreground"][0]) == flag
    assert not list((judged / "models" / "backbone_0" / "mvtec_tire").glob("*.pth"))
    assert f"--distribution 1 judges only: mvtec_tire {flag} " in said and "nothing trained" in said

    # --distribution 0 with no table listing tire (the shipped one has MVTec AD's classes only): judged as
    # --distribution 1 judges it, recorded, and trained exactly as with that hypothesis forced.
    fallback = tmp_path / "fallback"
    _run(["--results_path", str(fallback), "--gpu", "-1", *net, *dataset("0")])
    state = _checkpoint(fallback)
    assert (state["svd"], state["judged_distribution"]) == (flag, flag)
    assert _table(fallback).equals(table)
    forced = tmp_path / "forced"
    _run(["--results_path", str(forced), "--gpu", "-1", *net, *dataset("3" if flag else "2")])
    other = _checkpoint(forced)
    assert other["svd"] == flag and other["judged_distribution"] is None
    for part in ("discriminator", "pre_projection"):
        for key, value in state[part].items():
            assert torch.equal(value, other[part][key]), (part, key)
    assert (fallback / "results.csv").read_text() == (forced / "results.csv").read_text()

    # --distribution 0 and 4 read the table the judged run wrote: its hypothesis and the opposite one.
    for distribution, expected in (("0", flag), ("4", 1 - flag)):
        results = tmp_path / f"table_{distribution}"
        shutil.copytree(judged / "datasets", results / "datasets")
        _run(["--results_path", str(results), "--gpu", "-1", *net, *dataset(distribution)])
        state = _checkpoint(results)
        assert (state["svd"], state["judged_distribution"]) == (expected, None)

    # --distribution 4 for a class missing from the table: the opposite of the judgement it records, as the
    # rerun above that reads the recorded table trains.
    opposite = tmp_path / "fallback_4"
    _run(["--results_path", str(opposite), "--gpu", "-1", *net, *dataset("4")])
    state = _checkpoint(opposite)
    assert (state["svd"], state["judged_distribution"]) == (1 - flag, flag)
    assert _table(opposite).equals(table)


def test_distribution_tables_are_searched_in_order_and_a_new_judgement_replaces_the_old(tmp_path):
    excel = tmp_path / "excel"
    utils.record_distributions(str(excel), "mvtec", {"mvtec_a": 1})
    utils.record_distributions(str(excel), "mvtec", {"mvtec_a": 0, "mvtec_b": 1})
    # The first folder has no table: the next one is read.
    assert utils.lookup_distribution([str(tmp_path / "none"), str(excel)], "mvtec", "mvtec_a") == (0, 0)
    assert utils.lookup_distribution([str(tmp_path / "none"), str(excel)], "mvtec", "mvtec_b") == (1, 1)
    import pandas as pd

    assert sorted(pd.read_excel(utils.excel_path(str(excel), "mvtec"))["Class"]) == ["mvtec_a", "mvtec_b"]


def _folder_contents(folder) -> dict:
    """{relative path: bytes} of every file under ``folder``."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_judge_only_judges_a_trained_or_interrupted_class_and_leaves_its_folder_alone(tmp_path, tiny_tire, dtd_root):
    net = [*TINY_NET[:TINY_NET.index("--meta_epochs")], "--step", "2", "--limit", "8"]
    args = tiny_dataset_args(tiny_tire, dtd_root)
    trained = ["--results_path", str(tmp_path), "--gpu", "-1", *net, "--meta_epochs", "1", *args]
    _run(trained)
    class_dir = tmp_path / "models" / "backbone_0" / "mvtec_tire"
    before = _folder_contents(class_dir)
    rows = (tmp_path / "results.csv").read_text()
    args[args.index("--distribution") + 1] = "1"
    # 1 epoch asked: the class is finished (the reference would test it); 2 epochs: training would resume.
    for epochs in ("1", "2"):
        said = _run(["--results_path", str(tmp_path), "--gpu", "-1", *net, "--meta_epochs", epochs, *args])
        assert "--distribution 1 judges only: mvtec_tire " in said and "nothing trained" in said
        assert "testing its best checkpoint" not in said and "resuming" not in said.lower()
        assert _folder_contents(class_dir) == before
        assert (tmp_path / "results.csv").read_text() == rows
        assert list(_table(tmp_path)["Class"]) == ["mvtec_tire"]
    # Judging synthesises nothing, so the class needs no foreground masks, whatever --fg says (it has none).
    assert not (tiny_tire / "fg_mask").exists()
    args[args.index("--fg") + 1] = "1"
    said = _run(["--results_path", str(tmp_path), "--gpu", "-1", *net, "--meta_epochs", "1", *args])
    assert "--distribution 1 judges only: mvtec_tire " in said


def test_fg_2_for_a_class_missing_from_the_table_follows_the_foreground_flag_its_judgement_records(tmp_path, tiny_tire,
                                                                                                    dtd_root):
    # The class with foreground masks (the left half of each image), so that using them or not changes training.
    root = tmp_path / "data"
    shutil.copytree(tiny_tire / "tire", root / "tire")
    (root / "fg_mask" / "tire").mkdir(parents=True)
    for path in (root / "tire" / "train" / "good").iterdir():
        width, height = PIL.Image.open(path).size
        mask = np.zeros((height, width), np.uint8)
        mask[:, : width // 2] = 255
        PIL.Image.fromarray(mask).save(root / "fg_mask" / "tire" / path.name)
    net = [*TINY_NET[:TINY_NET.index("--meta_epochs")], "--meta_epochs", "1", "--step", "2", "--limit", "8"]

    def run(results, distribution: str, fg: str) -> dict:
        args = tiny_dataset_args(root, dtd_root)
        args[args.index("--distribution") + 1] = distribution
        args[args.index("--fg") + 1] = fg
        _run(["--results_path", str(results), "--gpu", "-1", *net, *args])
        return _checkpoint(results) if distribution != "1" else {}

    judged = tmp_path / "judged"
    run(judged, "1", "2")
    flag = int(_table(judged)["Foreground"][0])
    # Judged in the run, then trained: as the rerun below, which reads the table the judgement recorded.
    in_run = run(tmp_path / "in_run", "0", "2")
    assert in_run["judged_distribution"] == flag
    rerun = tmp_path / "rerun"
    shutil.copytree(judged / "datasets", rerun / "datasets")
    from_table = run(rerun, "0", "2")
    forced_other = run(tmp_path / "other_fg", "3" if flag else "2", str(1 - flag))
    same = other = True
    for part in ("discriminator", "pre_projection"):
        for key, value in in_run[part].items():
            same &= torch.equal(value, from_table[part][key])
            other &= torch.equal(value, forced_other[part][key])
    assert same and not other  # the other foreground flag trains another model

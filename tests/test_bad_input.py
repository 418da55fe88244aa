"""Bad input ends with one line on stderr (``Error: ...``), exit code 2, no traceback, and loses nothing.

Every test runs the CLI over a copy of the results of an earlier tiny run (a results.csv, run record,
config and checkpoints) and checks that those files are still there, byte for byte, afterwards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch

import glass
from conftest import TINY_NET, copy_class_subset, run_main, tiny_dataset_args

CLASS_DIR = Path("models") / "backbone_0" / "mvtec_tire"
NET = [*TINY_NET, "--meta_epochs", "1", "--limit", "4"]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tire_root) -> Path:
    """8 training images, 3 good and 4 defective test images of `tire`."""
    root = tmp_path_factory.mktemp("bad_input_data")
    copy_class_subset(tire_root / "tire", root / "tire", n_train=8, n_good=3, n_per_defect=1)
    return root


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, small_data, dtd_root) -> Path:
    """Results of an earlier one-epoch run on `tire`."""
    results = tmp_path_factory.mktemp("previous_run")
    assert run_main(["--results_path", results, *NET, *tiny_dataset_args(small_data, dtd_root)]) == 0
    return results


@pytest.fixture
def results(tmp_path, previous_run) -> Path:
    """A copy of the earlier run's results folder for one test to run over."""
    path = tmp_path / "results"
    shutil.copytree(previous_run, path)
    return path


@pytest.fixture
def data(tmp_path, small_data) -> Path:
    """A copy of the data that a test may break."""
    path = tmp_path / "data"
    shutil.copytree(small_data, path)
    return path


def earlier_outputs(results: Path) -> dict:
    """The files an earlier run left that must survive: results, run records, config, checkpoints."""
    kept = {}
    for path in results.rglob("*"):
        if path.is_file() and (path.suffix in (".csv", ".pth") or path.name == "config.json" or path.name.startswith("run_")):
            kept[str(path.relative_to(results))] = path.read_bytes()
    assert {"results.csv", str(CLASS_DIR / "ckpt.pth"), str(CLASS_DIR / "ckpt_best_0.pth")} <= set(kept)
    return kept


def assert_fails(capsys, results: Path, args, *fragments, usage: bool = False) -> str:
    """Run the CLI; it must exit 2 with one ``Error:`` line naming ``fragments``; earlier outputs intact."""
    before = earlier_outputs(results)
    code = run_main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line) and "\r" not in line]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, err
    if usage:  # click's own usage errors: the error and a pointer to --help
        assert len(lines) <= 2 and all(line.startswith(("Error: ", "Try '")) for line in lines), lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    for name, content in before.items():
        assert (results / name).is_file() and (results / name).read_bytes() == content, f"{name} was lost or changed"
    return errors[0]


def cli_args(results: Path, data: Path, dtd: Path, net=(), dataset=(), main=()) -> list:
    return ["--results_path", results, *main, *NET, *net, *tiny_dataset_args(data, dtd, extra=dataset)]


# --------------------------------------------------------------------------------------------------
# Paths and data

def test_a_left_out_dataset_name_is_named_not_the_aug_path(capsys, results, data, dtd_root):
    args = cli_args(results, data, dtd_root)
    args.remove("mvtec")  # DATA_PATH now stands where NAME belongs, AUG_PATH where DATA_PATH does
    assert_fails(capsys, results, args, f"'{data}' is a path, not a dataset name: give NAME first", usage=True)
    assert_fails(capsys, results, [*args[:-2], "MVTec", *args[-2:]], "unknown dataset 'MVTec': choose one of", usage=True)


@pytest.mark.parametrize("again", [["net", "--meta_epochs", "3"], ["dataset", "-d", "tire", "mvtec"]])
def test_a_subcommand_given_twice_is_refused(capsys, results, data, dtd_root, again):
    # A second `net` or `dataset` would replace the first (or fail for the options given to the first).
    args = cli_args(results, data, dtd_root)
    at = args.index("dataset")
    args = [*args[:at], *again, *([str(data), str(dtd_root)] if again[0] == "dataset" else []), *args[at:]]
    assert_fails(capsys, results, args, f"`{again[0]}` is given twice: give all its options to one `{again[0]}`",
                 usage=True)


def test_missing_data_path(capsys, results, tmp_path, dtd_root):
    assert_fails(capsys, results, cli_args(results, tmp_path / "nowhere", dtd_root), "DATA_PATH", "does not exist", usage=True)


def test_missing_texture_path(capsys, results, data, tmp_path):
    assert_fails(capsys, results, cli_args(results, data, tmp_path / "no_dtd"), "AUG_PATH", "does not exist", usage=True)


def test_more_workers_than_cores_is_one_warning_line(capsys, caplog, results, data, dtd_root, monkeypatch):
    import utils

    monkeypatch.setattr(utils, "usable_cores", lambda: 2)
    args = cli_args(results, data, dtd_root, dataset=["--num_workers", "6"])
    args[args.index("tire")] = "bottle"  # stops after the options are read
    with caplog.at_level("WARNING"):
        assert_fails(capsys, results, args, "class 'bottle' not found")
    said = [record.getMessage() for record in caplog.records if "num_workers" in record.getMessage()]
    assert said == ["--num_workers 6 is more than the 2 core(s) this process can use: the workers share them with "
                    "training (torch suggests at most 2)"]


def test_texture_folder_without_images(capsys, results, data, tmp_path):
    (tmp_path / "empty_dtd" / "banded").mkdir(parents=True)
    assert_fails(capsys, results, cli_args(results, data, tmp_path / "empty_dtd"), "holds no images", "DTD")


def test_class_folder_missing(capsys, results, data, dtd_root):
    args = cli_args(results, data, dtd_root)
    args[args.index("tire")] = "bottle"
    assert_fails(capsys, results, args, "class 'bottle' not found", "available classes are tire")
    args[args.index("bottle")] = "tire,bottle"
    assert_fails(capsys, results, args, "class 'tire,bottle' not found", "give each class with its own -d (-d tire -d bottle)")


def test_testing_a_class_on_data_elsewhere_than_its_training_data_says_so(capsys, caplog, results, data, dtd_root):
    trained_on = json.loads((results / CLASS_DIR / "config.json").read_text())["dataset"]["data_path"]
    with caplog.at_level("WARNING"):
        assert run_main(cli_args(results, Path(trained_on), dtd_root, main=["--test", "test"])) == 0
    assert "trained on the data in" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # data: a copy of the training data
        assert run_main(cli_args(results, data, dtd_root, main=["--test", "test"])) == 0
    assert f"Testing mvtec_tire, trained on the data in {trained_on}, on the test images in {data}" in caplog.text


def test_empty_train_good(capsys, results, data, dtd_root):
    for path in (data / "tire" / "train" / "good").iterdir():
        path.unlink()
    assert_fails(capsys, results, cli_args(results, data, dtd_root), "train/good")


def test_test_image_without_any_matching_mask(capsys, results, data, dtd_root):
    # A defect type whose mask files are all named unlike its images (one missing mask alone is accepted:
    # that image is left out of the pixel metrics, see datasets/base.py).
    for mask in (data / "tire" / "ground_truth" / "cut").iterdir():
        mask.rename(mask.with_name("x" + mask.name))
    assert_fails(capsys, results, cli_args(results, data, dtd_root), "ground_truth/cut", "_mask.png")


def test_mask_size_differs_from_its_image(capsys, results, data, dtd_root):
    mask = next((data / "tire" / "ground_truth" / "hole").iterdir())
    with PIL.Image.open(mask) as image:
        image.resize((image.width // 2, image.height // 2)).save(mask)
    assert_fails(capsys, results, cli_args(results, data, dtd_root), "another size", mask.name)


def test_unreadable_image(capsys, results, data, dtd_root):
    broken = sorted((data / "tire" / "test" / "good").iterdir())[0]
    broken.write_bytes(b"this is not a PNG file")
    assert_fails(capsys, results, cli_args(results, data, dtd_root), "unreadable image", broken.name)


def test_an_image_over_pillows_pixel_limit_is_named_as_such(capsys, monkeypatch, results, data, dtd_root):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 140_000)  # tire's 320 x 427 pass; twice the limit does not
    large = sorted((data / "tire" / "test" / "good").iterdir())[0]
    PIL.Image.open(large).resize((640, 854)).save(large)
    assert_fails(capsys, results, cli_args(results, data, dtd_root), "1 image over Pillow's pixel limit",
                 f"{large.name}; Pillow refuses images of more than 280000 pixels as possible decompression bombs: "
                 "downscale them")


def test_an_image_too_elongated_to_resize(capsys, results, data, dtd_root, tmp_path):
    thin = data / "tire" / "train" / "good" / "thin.png"
    PIL.Image.new("L", (3_000_000, 1), 128).save(thin)  # resized to 64 px high: 192,000,000 x 64 pixels (memory ran out)
    assert_fails(capsys, results, cli_args(results, data, dtd_root), "image too elongated to resize",
                 "thin.png 3000000x1", "crop them to less elongated images")
    assert_fails(capsys, results, ["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5",
                                   "--output", tmp_path / "out", thin],
                 "thin.png is 3000000x1 pixels: resized to 64 on its shorter side it would take 12288 million pixels",
                 "crop it to a less elongated image")
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_truncated_image_read_in_a_dataloader_worker(capsys, results, data, dtd_root):
    # The header is intact, so the problem shows when a DataLoader worker decodes the image (here while
    # testing the finished class): the worker's re-raised error must still end as one line.
    truncated = sorted((data / "tire" / "test" / "good").iterdir())[0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    assert_fails(capsys, results, cli_args(results, data, dtd_root, dataset=["--num_workers", "1"]),
                 "cannot read image", truncated.name, "truncated")


@pytest.mark.parametrize("signum", ["SIGBUS", "SIGKILL"])
def test_a_dataloader_worker_that_dies_ends_the_run_with_advice(capsys, monkeypatch, results, data, dtd_root, signum):
    # Docker's 64 MB /dev/shm kills workers with SIGBUS, the out-of-memory killer with SIGKILL: one line, no traceback.
    import os
    import signal

    import datasets.base

    load_image = datasets.base.load_image

    def dying_in_a_worker(*args, **kwargs):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), getattr(signal, signum))
        return load_image(*args, **kwargs)

    monkeypatch.setattr(datasets.base, "load_image", dying_in_a_worker)  # the workers are forked: they see it
    assert_fails(capsys, results, cli_args(results, data, dtd_root, dataset=["--num_workers", "1"]),
                 "data loading failed (DataLoader worker (pid", "/dev/shm", "dataset --num_workers 0")
    assert json.loads((results / "run.json").read_text())["status"].startswith("failed: DataLoader worker (pid")


def test_a_truncated_training_image_stops_its_class_only(capsys, tmp_path, data, dtd_root):
    # Found only when decoded (the layout check reads headers): that class stops, the next one still trains.
    shutil.copytree(data / "tire", data / "tire2")
    truncated = sorted((data / "tire" / "train" / "good").iterdir())[0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    results = tmp_path / "fresh"
    args = ["--results_path", results, *NET, *tiny_dataset_args(data, dtd_root, classes=("tire", "tire2"),
                                                                extra=("--num_workers", "1"))]
    assert run_main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("Error: mvtec_tire: cannot read image") and truncated.name in errors[0]
    with open(results / "results.csv") as handle:
        assert [line.split(",")[0] for line in handle.read().splitlines()[1:]] == ["mvtec_tire2", "Mean"]
    assert json.loads((results / "run.json").read_text())["stopped"] == [errors[0][len("Error: "):]]


# --------------------------------------------------------------------------------------------------
# Model options

def test_unknown_backbone(capsys, results, data, dtd_root):
    assert_fails(capsys, results, cli_args(results, data, dtd_root, net=["-b", "resnet7"]), "unknown backbone 'resnet7'")


def test_no_feature_layer_names_the_backbones_usual_ones(capsys, results, tmp_path, dtd_root):
    (tmp_path / "no_classes").mkdir()  # checked before the data, whose error would be "class 'tire' not found"
    args = ["--results_path", results, "net", "-b", "efficientnet_lite0", "--meta_epochs", "1",
            *tiny_dataset_args(tmp_path / "no_classes", dtd_root)]
    assert_fails(capsys, results, args, "no feature layers given", "for efficientnet_lite0, e.g. -le blocks.2 -le blocks.4")


def test_unknown_layer(capsys, results, data, dtd_root):
    assert_fails(capsys, results, cli_args(results, data, dtd_root, net=["-le", "layer9"]), "layer 'layer9' not found")


def test_layer_without_a_feature_map(capsys, results, data, dtd_root, tmp_path):
    fresh = tmp_path / "fresh"
    assert_fails(capsys, results, cli_args(fresh, data, dtd_root, net=["-le", "classifier"]),
                 "layer 'classifier' gives (1, 1000), not a feature map", "-le blocks.2")


def test_imagesize_not_a_multiple_of_downsampling(capsys, results, data, dtd_root):
    assert_fails(capsys, results, cli_args(results, data, dtd_root, dataset=["--imagesize", "60"]),
                 "--imagesize 60 is not a multiple of --downsampling 8", usage=True)


def test_mask_grid_unlike_the_feature_grid(capsys, results, data, dtd_root, tmp_path):
    # 64 / 4 = 16x16 Perlin masks, but blocks.2 of EfficientNet-Lite0 has stride 8 (8x8): refused before training.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    message = assert_fails(capsys, results, cli_args(fresh, data, dtd_root, dataset=["--downsampling", "4"]),
                           "16x16 anomaly mask grid", "8x8 feature grid", "use --downsampling 8")
    assert not list(fresh.rglob("ckpt*.pth")), message


@pytest.mark.parametrize("where, option, value", [
    ("dataset", "--batch_size", "0"),
    ("dataset", "--batch_size", "-8"),
    ("dataset", "--imagesize", "-64"),
    ("dataset", "--resize", "0"),
    ("net", "--target_embed_dimension", "0"),
    ("net", "--meta_epochs", "-1"),
])
def test_zero_or_negative_sizes(capsys, results, data, dtd_root, where, option, value):
    extra = {where: [option, value]}
    assert_fails(capsys, results, cli_args(results, data, dtd_root, **extra), option, value, usage=True)


@pytest.mark.parametrize("where, option, value, says", [
    ("net", "--radius", "1.5", "0<=x<=1"),  # a quantile
    ("net", "--p", "-0.5", "0<=x<=1"),
    ("net", "--noise", "-1", "x>=0"),
    ("net", "--lr", "0", "x>0"),
    ("net", "--lr", "nan", "not a finite number"),
    ("net", "--patchsize", "2", "odd"),
    ("dataset", "--std", "-1", "x>=0"),
    ("dataset", "--translate", "2", "0<=x<=1"),
    ("dataset", "--scale", "1.5", "0<=x<1"),
    ("dataset", "--rotate_degrees", "-10", "x>=0"),
    ("dataset", "--hflip", "2", "0<=x<=1"),
    ("dataset", "--brightness", "-0.2", "x>=0"),
    ("net", "--eval_epochs", "5", "no epoch would be evaluated"),  # --meta_epochs 1
    ("dataset", "-d", "tire", "tire given more than once"),
    ("net", "-b", "efficientnet_lite0", "efficientnet_lite0 given more than once: name each backbone once"),
    ("dataset", "-d", "../tire", "is not a class folder name"),
])
def test_option_values_out_of_range_are_refused_before_anything_runs(capsys, results, data, dtd_root, where, option,
                                                                       value, says):
    extra = {where: [option, value]}
    assert_fails(capsys, results, cli_args(results, data, dtd_root, **extra), option, value, says, usage=True)


@pytest.mark.parametrize("args, says", [
    (["--seed", "-1"], ["--seed", "-1", "0<=x<=4294967295"]),
    (["--seed", "4294967296"], ["--seed", "4294967296", "0<=x<=4294967295"]),
])
def test_a_seed_numpy_refuses_is_refused_before_anything_runs(capsys, results, data, dtd_root, tmp_path, args, says):
    fresh = tmp_path / "fresh"
    assert_fails(capsys, results, cli_args(fresh, data, dtd_root, main=args), *says, usage=True)
    assert not fresh.exists()  # no run.json recording a failure


@pytest.mark.parametrize("args, says", [
    (["--gpu", "-1", "--gpu", "0"], ["--gpu", "-1 (the CPU) cannot be combined with GPU ids"]),
    (["--gpu", "1", "--gpu", "-1"], ["--gpu", "-1 (the CPU) cannot be combined with GPU ids"]),
    (["--gpu", "-2"], ["--gpu", "-2 is not a device", "-1 for the CPU"]),
])
def test_gpu_ids_that_mix_the_cpu_in_or_name_no_device_are_refused_before_anything_runs(capsys, results, data,
                                                                                         dtd_root, tmp_path, args, says):
    fresh = tmp_path / "fresh"
    assert_fails(capsys, results, cli_args(fresh, data, dtd_root, main=args), *says, usage=True)
    assert not fresh.exists()


@pytest.mark.parametrize("name", ["efficientnet_lite0.seed--5", "efficientnet_lite0.seed-99999999999"])
def test_a_backbone_seed_out_of_range_is_refused_before_anything_runs(capsys, results, data, dtd_root, tmp_path, name):
    fresh = tmp_path / "fresh"
    assert_fails(capsys, results, cli_args(fresh, data, dtd_root, net=["-b", name]),
                 f"seed suffix in backbone name '{name}'", "from 0 to 4294967295")
    assert not fresh.exists()


def test_help_shows_every_range_without_click_placeholders():
    from click.testing import CliRunner

    import main

    texts = {command: CliRunner().invoke(main.main, [*command.split(), "--help"]).output
             for command in ("", "net", "dataset", "predict")}
    for text in texts.values():
        assert "None" not in text, text  # an unbounded range once read "x<=None"
    assert "0<=x<=4" in texts["dataset"]  # --distribution: bounded ranges are still shown
    assert "[default: 0.5; finite]" in texts["dataset"]  # --mean: unbounded, but no nan or inf


def test_help_is_printed_without_a_log_line(capsys, caplog):
    import main

    caplog.set_level("INFO")
    assert main.cli(["net", "--help"]) == 0
    assert "Usage: main.py net [OPTIONS]" in capsys.readouterr().out and caplog.text == ""
    assert main.cli(["--gpu", "-1", "net"]) == 2  # any other command line is logged first, as the reference does
    assert "Command line arguments: main.py --gpu -1 net" in caplog.text


def test_help_and_option_mistakes_answer_without_importing_torch():
    """--help and option mistakes need only click: torch, torchvision and scikit-learn (seconds) wait."""
    import subprocess
    import sys

    script = ("import sys, main\n"
              "codes = [main.cli(args) for args in (['--help'], ['net', '--help'], ['dataset', '--help'],\n"
              "         ['predict', '--help'], ['net', '--dsc_hidden', 'x'], ['net'])]\n"
              "heavy = sorted(name for name in ('torch', 'torchvision', 'sklearn', 'cv2', 'glass') if name in sys.modules)\n"
              "print(codes, heavy)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0, 2, 2] []"
    assert "'x' is not a valid integer range" in done.stderr and "Error: no backbone given: add -b NAME" in done.stderr


def test_ctrl_c_says_how_to_go_on(capsys, monkeypatch):
    import main

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(main.main, "invoke", interrupted)
    assert main.cli(["--gpu", "-1", "net"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("Interrupted (Ctrl-C): rerun the same command to go on (training resumes "
                                            "after its last finished epoch).") and "Traceback" not in err


@pytest.mark.parametrize("test, says", [
    ("ckpt", "rerun the same command to go on (training resumes after its last finished epoch)."),
    ("test", "rerun the same command to run it again."),  # a test-only run has no training to resume
])
def test_ctrl_c_in_a_run_says_whether_training_resumes(capsys, monkeypatch, results, data, dtd_root, test, says):
    import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "_run_classes", interrupted)
    assert main.cli([str(arg) for arg in cli_args(results, data, dtd_root, main=["--test", test])]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"Interrupted (Ctrl-C): {says}" and "Traceback" not in err


@pytest.mark.parametrize("moved, says", [
    (["--resize", "64"], "--resize is a `dataset` option: give it after `dataset`, before NAME DATA_PATH AUG_PATH"),
    (["--results_path", "elsewhere"], "--results_path is an option of main.py itself: give it before `net`"),
    (["-d", "tire"], "-d is a `dataset` option"),
])
def test_an_option_after_the_data_paths_says_where_it_belongs(capsys, results, data, dtd_root, moved, says):
    args = cli_args(results, data, dtd_root)
    if moved[0] == "-d":
        at = args.index("-d")
        del args[at:at + 2]
    assert_fails(capsys, results, [*args, *moved], says, usage=True)


def test_resize_below_imagesize_warns_about_the_zero_border(caplog, results, data, dtd_root):
    assert run_main(cli_args(results, data, dtd_root, main=["--test", "test"], dataset=["--resize", "48"])) == 0
    assert "--resize 48 is smaller than --imagesize 64: the centre crop pads the images with a zero border" in caplog.text


def test_a_class_with_a_trailing_slash_is_the_same_class(capsys, results, data, dtd_root):
    args = cli_args(results, data, dtd_root, dataset=["-d", "tire/"])  # as shell completion writes it
    assert_fails(capsys, results, args, "tire given more than once", usage=True)


# --------------------------------------------------------------------------------------------------
# Checkpoints

def test_test_only_without_a_checkpoint_names_the_class_after_testing_the_others(capsys, results, data, dtd_root):
    shutil.copytree(data / "tire", data / "tire2")  # a class that was never trained
    args = cli_args(results, data, dtd_root, main=["--test", "test"])
    at = args.index("tire")
    args[at:at + 1] = ["tire2", "-d", "tire"]  # the untrained class first: the trained one is still tested
    shutil.rmtree(results / "eval")
    assert_fails(capsys, results, args, "no ckpt_best_*.pth", "mvtec_tire2", "train first")
    assert len(list((results / "eval" / "mvtec_tire").glob("*.png"))) == 7  # tire was tested all the same
    record = json.loads((results / "run.json").read_text())  # the stopped class is recorded as it stops
    assert [message.split(":")[0] for message in record["stopped"]] == ["mvtec_tire2"]
    assert record["status"].startswith("failed: mvtec_tire2: no ckpt_best_*.pth")
    untouched = results / "models" / "backbone_0" / "mvtec_tire2"  # nothing in it but the class lock
    assert [path.name for path in untouched.iterdir()] == [".lock"]


def test_test_only_of_a_lone_class_without_a_checkpoint_says_so_once(capsys, caplog, results, data, dtd_root):
    """The class's stop is logged as it happens when other classes run (previous test); alone, the final error
    line is the only one that says it."""
    shutil.copytree(data / "tire", data / "tire2")
    args = cli_args(results, data, dtd_root, main=["--test", "test"])
    args[args.index("tire")] = "tire2"
    assert_fails(capsys, results, args, "mvtec_tire2: no ckpt_best_*.pth", "train first")
    assert not [record for record in caplog.records if "no ckpt_best" in record.getMessage()]
    args[args.index("tire2"):args.index("tire2") + 1] = ["tire2", "-d", "tire"]
    assert_fails(capsys, results, args, "mvtec_tire2: no ckpt_best_*.pth", "train first")
    assert [record.levelname for record in caplog.records if "no ckpt_best" in record.getMessage()] == ["ERROR"]


def test_testing_a_finished_class_at_another_resize_warns_naming_it(caplog, results, data, dtd_root):
    args = cli_args(results, data, dtd_root, main=["--test", "test"], dataset=["--resize", "72"])
    assert run_main(args) == 0
    assert "Testing mvtec_tire on images prepared otherwise than at its training (dataset.resize: 64 -> 72" in caplog.text
    caplog.clear()
    assert run_main(cli_args(results, data, dtd_root, main=["--test", "test"])) == 0
    assert "prepared otherwise" not in caplog.text


def test_truncated_best_checkpoint(capsys, results, data, dtd_root):
    best = results / CLASS_DIR / "ckpt_best_0.pth"
    best.write_bytes(best.read_bytes()[:1000])
    assert_fails(capsys, results, cli_args(results, data, dtd_root, main=["--test", "test"]),
                 "cannot read checkpoint", "ckpt_best_0.pth", "damaged")


def test_test_only_goes_on_past_a_truncated_training_checkpoint(caplog, results, data, dtd_root):
    ckpt = results / CLASS_DIR / "ckpt.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert run_main(cli_args(results, data, dtd_root, main=["--test", "test"])) == 0  # needs ckpt_best_*.pth only
    assert "cannot read checkpoint" in caplog.text and "testing the best checkpoint all the same" in caplog.text


def test_exception_summary_is_the_first_sentence_cut_at_a_word():
    from utils import exception_summary

    assert exception_summary(RuntimeError("reading zip archive failed. This is an internal error. If you")) == \
        "reading zip archive failed."
    assert exception_summary(RuntimeError("word " * 100), limit=22) == "word word word word ..."
    assert exception_summary(ValueError()) == "ValueError"
    assert exception_summary(KeyError(105)) == "KeyError: 105"  # a bare key says nothing on its own
    assert exception_summary(OSError("line one\nline two")) == "line one"


def test_error_message_is_one_line_and_unwraps_a_dataloader_workers_traceback():
    from utils import GlassError, error_message

    assert error_message(OSError("  no space\n  left  on\tdevice ")) == "no space left on device"
    worker = GlassError("Caught GlassError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        '  File "datasets/base.py", line 9, in load_image\n'
                        "utils.GlassError: cannot read image a.png (truncated):  replace it\n")
    assert error_message(worker) == "cannot read image a.png (truncated): replace it"


def test_shared_memory_failures_are_told_apart_from_other_runtime_errors():
    from utils import loader_failure_message

    in_a_worker = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                               "call last):\n  File \"torch/multiprocessing/reductions.py\", line 1, in reduce_storage\n"
                               "RuntimeError: unable to write to file </torch_412_2734_0>: No space left on device (28)\n")
    message = loader_failure_message(in_a_worker)
    assert message.startswith("data loading failed (unable to write to file </torch_412_2734_0>: No space left on "
                              "device (28)): ") and "dataset --num_workers 0" in message
    assert loader_failure_message(RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_3>: Success"))
    assert loader_failure_message(RuntimeError("unable to open shared memory object </torch_1_2_3> in read-write mode"))
    assert loader_failure_message(RuntimeError("DataLoader worker (pid 77) is killed by signal: Bus error. "))
    for other in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3 and 4x5)"),
                  RuntimeError("out of resource: shared memory, Required: 98304, Hardware limit: 65536"),
                  OSError("DataLoader worker (pid 77) exited unexpectedly")):  # only torch's RuntimeErrors
        assert loader_failure_message(other) is None


def test_out_of_memory_ends_the_run_with_advice(capsys, monkeypatch, results, data, dtd_root):
    cuda = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which 1.06 GiB "
            "is free. Of the allocated memory 20.1 GiB is allocated by PyTorch. If reserved but unallocated memory is "
            "large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")

    def out_of_memory(self, batch):
        raise torch.OutOfMemoryError(cuda)

    monkeypatch.setattr(glass.GLASS, "_train_step", out_of_memory)
    message = assert_fails(capsys, results, cli_args(results, data, dtd_root, net=["--meta_epochs", "2"]),
                           "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): ", "--batch_size",
                           "resumes training")
    assert "expandable_segments" not in message
    assert json.loads((results / "run.json").read_text())["status"].startswith("failed: CUDA out of memory.")


def test_out_of_memory_in_a_worker_embedding_images_ends_the_run_with_advice(capsys, monkeypatch, results, data,
                                                                          dtd_root):
    """At one torch thread the DataLoader workers run the backbone (glass.EmbeddingCollate): their out-of-memory
    error comes back wrapped in the worker's traceback and still ends the run with the one line."""
    def out_of_memory(self, items):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 7340032 bytes.")

    monkeypatch.setattr(glass.EmbeddingCollate, "__call__", out_of_memory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_fails(capsys, results, cli_args(results, data, dtd_root, net=["--meta_epochs", "2"],
                                               dataset=["--num_workers", "2"]),
                     "out of memory (DefaultCPUAllocator: not enough memory: you tried to allocate 7340032 bytes): ",
                     "--batch_size")
    finally:
        torch.set_num_threads(threads)


def test_out_of_memory_in_predict_says_to_run_it_again_not_that_training_resumes(capsys, results, data, monkeypatch):
    def out_of_memory(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(glass.GLASS, "_predict", out_of_memory)
    image = str(next((data / "tire" / "test" / "good").glob("*.png")))
    message = assert_fails(capsys, results, ["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5",
                                             image], "out of memory (CUDA out of memory", "then run the same command again")
    assert "training" not in message


def test_out_of_memory_messages_keep_torchs_first_sentences():
    from utils import out_of_memory_message

    mps = ("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: 18.13 GB). "
           "Tried to allocate 256.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable the limit")
    cpu = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory_message(RuntimeError(mps)).startswith(
        "out of memory (MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: "
        "18.13 GB). Tried to allocate 256.00 MB): ")
    assert out_of_memory_message(RuntimeError(cpu)).startswith(
        "out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000000 bytes): ")
    assert out_of_memory_message(torch.OutOfMemoryError("CUDA out of memory.")).startswith("out of memory (CUDA out "
                                                                                            "of memory): ")
    numpy = MemoryError("Unable to allocate 3.20 GiB for an array with shape (4096, 209952) and data type float32")
    assert out_of_memory_message(numpy).startswith("out of memory (Unable to allocate 3.20 GiB for an array with "
                                                   "shape (4096, 209952) and data type float32): ")
    assert out_of_memory_message(MemoryError()).startswith("out of memory (MemoryError): ")
    for other in (RuntimeError("Expected all tensors to be on the same device"), OSError("CUDA out of memory.")):
        assert out_of_memory_message(other) is None


def test_truncated_training_checkpoint(capsys, results, data, dtd_root):
    ckpt = results / CLASS_DIR / "ckpt.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert_fails(capsys, results, cli_args(results, data, dtd_root, net=["--meta_epochs", "2"]),
                 "cannot read checkpoint", "ckpt.pth", "delete it to train mvtec_tire from the start")


@pytest.mark.parametrize("kind", ["folder", "link to nowhere"])
def test_a_training_checkpoint_that_is_not_a_file_stops_training(capsys, results, data, dtd_root, kind):
    # Passed over as absent, it made a folder with a best checkpoint count as finished (by the reference?).
    ckpt = results / CLASS_DIR / "ckpt.pth"
    ckpt.unlink()
    if kind == "folder":
        ckpt.mkdir()
    else:
        ckpt.symlink_to(results / "moved" / "ckpt.pth")
    best = (results / CLASS_DIR / "ckpt_best_0.pth").read_bytes()
    assert run_main(cli_args(results, data, dtd_root, net=["--meta_epochs", "2"])) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in err and len(errors) == 1
    assert errors[0].endswith(f"ckpt.pth is {'not a file' if kind == 'folder' else 'a link to nowhere'}: move it away "
                              "(training resumes from that file, so it is not passed over)")
    assert (results / CLASS_DIR / "ckpt_best_0.pth").read_bytes() == best


def test_checkpoint_of_another_configuration(capsys, results, data, dtd_root):
    config = results / CLASS_DIR / "config.json"
    config.unlink()  # without its config.json only the checkpoint itself can tell
    assert_fails(capsys, results, cli_args(results, data, dtd_root, main=["--test", "test"], net=["--dsc_hidden", "64"]),
                 "ckpt_best_0.pth", "discriminator.body.block1.0.weight has shape (128, 128)", "(64, 128)")


def test_a_feature_adaptor_in_the_checkpoint_of_a_pre_proj_0_config(capsys, results, data, dtd_root):
    path = results / CLASS_DIR / "config.json"
    config = json.loads(path.read_text())
    config["net"]["pre_proj"] = 0  # it loaded without the adaptor and scored otherwise
    path.write_text(json.dumps(config))
    image = str(next((data / "tire" / "test" / "good").glob("*.png")))
    assert_fails(capsys, results, ["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5", image],
                 "ckpt_best_0.pth has a 'pre_projection' entry (a feature adaptor) but --pre_proj is 0")


def test_config_json_that_is_not_an_object(capsys, results, data, dtd_root):
    (results / CLASS_DIR / "config.json").write_text("[1, 2]")
    assert_fails(capsys, results, cli_args(results, data, dtd_root, main=["--test", "test"]),
                 "config.json holds a JSON list, not an object")


@pytest.mark.parametrize("damage, says", [
    (lambda config: config.pop("net"), "no net options"),
    (lambda config: config.update(input_shape=[3, "x", 64]), "input_shape is not three positive whole numbers"),
    (lambda config: config["net"].update(dsc_hidden=12.5), "net option(s) dsc_hidden missing or not positive"),
    (lambda config: config["dataset"].update(resize_used="x"), "dataset.resize_used is not a positive whole number"),
    (lambda config: config["dataset"].update(resize_used=[64, 80, 90]), "dataset.resize_used is not a positive whole"),
    (lambda config: config["dataset"].update(imagesize_used=32), "dataset.imagesize_used 32 is not the side of input_shape"),
    (lambda config: config.update(input_shape=[3, 64, 80]), "input_shape [3, 64, 80] is not [3, imagesize, imagesize]"),
    (lambda config: config["dataset"].update(name="foo"), "dataset.name 'foo' is not one of btad, custom,"),
])
def test_hand_damaged_config_json(capsys, results, data, dtd_root, damage, says):
    path = results / CLASS_DIR / "config.json"
    config = json.loads(path.read_text())
    damage(config)
    path.write_text(json.dumps(config))
    image = str(next((data / "tire" / "test" / "good").glob("*.png")))
    for args in (cli_args(results, data, dtd_root, main=["--test", "test"]),
                 ["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5", image]):
        assert_fails(capsys, results, args, "config.json is damaged", says, "restore it, or delete it")


@pytest.mark.parametrize("key, value, says", [
    ("epoch", "x", "epoch is 'x', not a whole number"),
    ("rng", "x", "rng is not the random generators' states"),
    ("judged_distribution", "x", "judged_distribution is 'x', not 0, 1 or None"),
    ("meta_epochs", "x", "meta_epochs is 'x', not a whole number"),
    ("best_record", [0.5, 1], "best_record is not six numbers"),
])
def test_hand_damaged_training_checkpoint(capsys, results, data, dtd_root, key, value, says):
    path = results / CLASS_DIR / "ckpt.pth"
    state = torch.load(path, weights_only=True)
    state[key] = value
    torch.save(state, path)
    assert_fails(capsys, results, cli_args(results, data, dtd_root, net=["--meta_epochs", "2"]),
                 f"ckpt.pth is damaged ({says})", "delete it to train mvtec_tire from the start")


def test_config_recorded_by_testing_a_reference_folder_with_wrong_options(capsys, caplog, results, data, dtd_root):
    # A folder as the reference leaves it: best checkpoint only. Its weights fit any --patchsize, so a test-only
    # run with a wrong one records it; the run warns, and the right options later say what to do.
    (results / CLASS_DIR / "config.json").unlink()
    (results / CLASS_DIR / "ckpt.pth").unlink()
    test_only = cli_args(results, data, dtd_root, main=["--test", "test"])
    assert run_main(cli_args(results, data, dtd_root, main=["--test", "test"], net=["--patchsize", "5"])) == 0
    assert "config.json from this run's options, since the class folder had none" in caplog.text
    capsys.readouterr()
    assert run_main(test_only) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "config.json was recorded by a test of this folder with other options (patchsize: 5 -> 3): rerun with " \
           "those, or delete" in errors[0]
    (results / CLASS_DIR / "config.json").unlink()
    assert run_main(test_only) == 0
    assert json.loads((results / CLASS_DIR / "config.json").read_text())["net"]["patchsize"] == 3


@pytest.mark.parametrize("damage, message", [
    ("truncated", "Error: cannot read image"),
    # resized to 64 px on its shorter side, 64 x 12,800,000 pixels (its tensors took 17 GB before the check)
    ("elongated", "thin.png is 1x200000 pixels: resized to 64 on its shorter side it would take 819 million pixels"),
])
def test_a_texture_that_cannot_be_used_stops_the_run(capsys, tmp_path, data, dtd_root, damage, message):
    textures = tmp_path / "textures" / "banded"
    textures.mkdir(parents=True)
    if damage == "truncated":
        source = sorted((dtd_root / "banded").iterdir())[0]
        (textures / source.name).write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    else:
        PIL.Image.new("RGB", (1, 200_000), (90, 60, 30)).save(textures / "thin.png")
    shutil.copytree(data / "tire", data / "tire2")
    results = tmp_path / "fresh"
    args = ["--results_path", results, *NET,
            *tiny_dataset_args(data, textures.parent, classes=("tire", "tire2"), extra=("--num_workers", "1"))]
    assert run_main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert message in errors[0] and errors[0].endswith("(a texture of AUG_PATH)")
    assert not (results / CLASS_DIR.parent / "mvtec_tire2").exists()  # the run stopped at the first class


@pytest.mark.parametrize("table, says", [
    ({"Class": ["mvtec_tire"], "Distribution": [1], "Foreground": [None]}, "the row mvtec_tire has Distribution, Foreground = 1, nan"),
    ({"Name": ["mvtec_tire"], "Distribution": [1], "Foreground": [1]}, "has no column Class"),
])
def test_hand_edited_distribution_table(capsys, results, data, dtd_root, tmp_path, table, says):
    import pandas as pd

    fresh = tmp_path / "fresh"
    (fresh / "datasets" / "excel").mkdir(parents=True)
    pd.DataFrame(table).to_excel(fresh / "datasets" / "excel" / "mvtec_distribution.xlsx", index=False)
    args = cli_args(fresh, data, dtd_root)
    args[args.index("--distribution") + 1] = "0"
    assert_fails(capsys, results, args, "mvtec_distribution.xlsx", says, "or delete it")


def test_distribution_table_that_is_not_an_xlsx_file(capsys, results, data, dtd_root, tmp_path):
    fresh = tmp_path / "fresh"
    table = fresh / "datasets" / "excel" / "mvtec_distribution.xlsx"
    table.parent.mkdir(parents=True)
    table.write_bytes(b"garbage")
    args = cli_args(fresh, data, dtd_root)
    args[args.index("--distribution") + 1] = "0"
    assert_fails(capsys, results, args, "cannot read", "mvtec_distribution.xlsx", "fix the table or delete it")
    assert table.read_bytes() == b"garbage"
    # --distribution 1 does not read it before judging; recording the judgement keeps it as .old.
    args[args.index("--distribution") + 1] = "1"
    assert run_main(args) == 0
    assert (table.parent / "mvtec_distribution.xlsx.old").read_bytes() == b"garbage"
    assert table.read_bytes()[:2] == b"PK"  # a new xlsx (zip) with the judged row


def test_checkpoint_trained_on_other_layers(capsys, results, data, dtd_root):
    # Same shapes, other features: only the class folder's config.json can tell.
    net = ["-le", "blocks.3"]
    assert_fails(capsys, results, cli_args(results, data, dtd_root, main=["--test", "test"], net=net),
                 "trained with other options", "layers_to_extract_from: ['blocks.2', 'blocks.4'] -> ['blocks.2', 'blocks.4', 'blocks.3']")


def test_checkpoint_trained_at_another_image_size_names_the_option(capsys, results, data, dtd_root):
    args = cli_args(results, data, dtd_root, main=["--test", "test"])
    args[args.index("--imagesize") + 1] = args[args.index("--resize") + 1] = "96"
    assert_fails(capsys, results, args, "input_shape (dataset --imagesize): [3, 64, 64] -> [3, 96, 96]")


# --------------------------------------------------------------------------------------------------
# Environment and training

def test_gpu_not_present(capsys, results, data, dtd_root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_fails(capsys, results, cli_args(results, data, dtd_root, main=["--gpu", "3"]),
                 "--gpu 3 is not present", "1 CUDA device")


def test_gpu_ids_select_the_first_wanted_cuda_device_and_minus_one_the_cpu(monkeypatch):
    import utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    assert utils.select_device([0]) == torch.device("cuda:0")
    assert utils.select_device([1, 0]) == torch.device("cuda:1")
    assert utils.select_device([-1]) == utils.select_device([]) == torch.device("cpu")
    with pytest.raises(utils.GlassError, match=r"--gpu 2 is not present: this machine has 2 CUDA device\(s\) \(ids 0..1\)"):
        utils.select_device([2])


def test_a_class_folder_that_another_run_is_using_stops_that_class(capsys, results, data, dtd_root):
    import main
    import utils

    with utils.file_lock(str(results / CLASS_DIR / main.CLASS_LOCK)) as held:  # as a run training it holds it
        assert held
        assert_fails(capsys, results, cli_args(results, data, dtd_root), "mvtec_tire: another run is training or testing",
                     "wait for it to end")
    assert run_main(cli_args(results, data, dtd_root)) == 0  # the lock goes with the run that held it


def test_results_path_not_writable(capsys, results, data, dtd_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_fails(capsys, results, cli_args(blocker / "results", data, dtd_root), "cannot write to --results_path")
    assert_fails(capsys, results, cli_args(blocker, data, dtd_root), f"--results_path {blocker} is a file: choose a folder")
    assert_fails(capsys, results, cli_args("", data, dtd_root), "--results_path is empty: give a folder")


def test_names_that_are_not_valid_utf8_are_refused_before_training(capsys, results, data, dtd_root, tmp_path):
    odd = os.fsdecode(b"r\xe9sults")  # TensorBoard failed on such paths with a UnicodeEncodeError traceback
    assert_fails(capsys, results, cli_args(tmp_path / odd, data, dtd_root), "is not valid UTF-8",
                 "TensorBoard writes only to such paths: choose a folder whose path is valid UTF-8")
    assert not (tmp_path / odd).exists()
    args = cli_args(tmp_path / "fresh", data, dtd_root)
    args[args.index("tire")] = os.fsdecode(b"t\xefre")
    assert_fails(capsys, results, args, "is not valid UTF-8", "rename the class folder", usage=True)


def test_diverging_training_stops_the_class_and_keeps_the_best_checkpoint(capsys, results, data, dtd_root, tmp_path):
    # Adam's first steps move every weight by about lr: the scores become NaN (in epoch 1 here) before any
    # loss does; epoch 0's best checkpoint stays.
    fresh = tmp_path / "fresh"
    assert_fails(capsys, results, cli_args(fresh, data, dtd_root, net=["--meta_epochs", "3", "--lr", "1e30"]),
                 "mvtec_tire: the discriminator's scores became non-finite at step", "in epoch 1, so training of this "
                 "class stopped (ckpt_best_0.pth is kept)", "lower --lr")
    assert not (fresh / "results.csv").exists()
    assert [p.name for p in fresh.rglob("ckpt_best_*.pth")] == ["ckpt_best_0.pth"]


@pytest.mark.parametrize("in_the_way", ["results.csv", "models"])
def test_a_file_or_folder_in_the_way_of_an_output(capsys, results, data, dtd_root, tmp_path, in_the_way):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    if in_the_way == "models":  # a file where the checkpoints' folder must go
        (fresh / "models").write_text("not a folder")
    else:  # a folder where results.csv must go (written after the class is tested)
        (fresh / "results.csv").mkdir()
    assert_fails(capsys, results, cli_args(fresh, data, dtd_root), str(fresh / in_the_way),
                 "a file or folder of that name is in the way")


def test_nan_loss_stops_the_class_and_keeps_the_best_checkpoint(capsys, results, data, dtd_root, tmp_path, monkeypatch):
    train_discriminator = glass.GLASS._train_discriminator

    class NaNLoss(torch.nn.Module):
        def forward(self, *_):
            return torch.tensor(float("nan"))

    def nan_from_epoch_2(self, training_data, epoch, *args, **kwargs):
        if epoch == 2:
            self.focal_loss = NaNLoss()
        return train_discriminator(self, training_data, epoch, *args, **kwargs)

    monkeypatch.setattr(glass.GLASS, "_train_discriminator", nan_from_epoch_2)
    fresh = tmp_path / "fresh"
    assert_fails(capsys, results, cli_args(fresh, data, dtd_root, net=["--meta_epochs", "3", "--lr", "0.001"]),
                 "mvtec_tire: the training loss became nan", "in epoch 2", "training of this class stopped",
                 "ckpt_best_1.pth is kept", "lower --lr")
    class_dir = fresh / CLASS_DIR
    assert sorted(p.name for p in class_dir.glob("ckpt_best_*.pth")) == ["ckpt_best_1.pth"]
    state = torch.load(class_dir / "ckpt.pth", weights_only=True)
    assert state["epoch"] == 1 and state["best_checkpoint"] == "ckpt_best_1.pth"
    assert all(torch.isfinite(t).all() for t in state["discriminator"].values())
    assert not (fresh / "results.csv").exists()


def test_resize_equal_to_imagesize_does_not_warn(caplog, results, data, dtd_root):
    assert run_main(cli_args(results, data, dtd_root, main=["--test", "test"])) == 0  # --resize 64 --imagesize 64
    assert "is smaller than --imagesize" not in caplog.text


def test_dot_dot_is_not_a_class_name(capsys, results, data, dtd_root):
    assert_fails(capsys, results, cli_args(results, data, dtd_root, dataset=["-d", ".."]), "-d", "..",
                 "is not a class folder name", usage=True)


def test_ctrl_c_during_training_is_recorded_as_interrupted(capsys, tmp_path, data, dtd_root, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(glass.GLASS, "trainer", interrupted)
    fresh = tmp_path / "fresh"
    assert run_main(cli_args(fresh, data, dtd_root)) == 130
    assert json.loads((fresh / "run.json").read_text())["status"] == "interrupted"


def test_chained_predict_with_another_dataset_name_is_checked_before_training(tmp_path, data, dtd_root, capsys):
    image = str(next((data / "tire" / "test" / "good").glob("*.png")))
    fresh = tmp_path / "fresh"
    args = [*cli_args(fresh, data, dtd_root), "predict", "-d", "tire", "--dataset", "visa", image]
    assert run_main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "neither trained by this run (mvtec: tire) nor in" in errors[0]
    assert "visa_tire" in errors[0]
    assert not list(fresh.rglob("*.pth"))  # refused before training


def test_a_checkpoint_without_a_discriminator_is_one_line(capsys, results, data, dtd_root):
    torch.save({"weights": {}}, results / CLASS_DIR / "ckpt_best_0.pth")  # a torch file, but not a GLASS checkpoint
    assert_fails(capsys, results, cli_args(results, data, dtd_root, main=["--test", "test"]),
                 "ckpt_best_0.pth is not a GLASS checkpoint (it has no 'discriminator' entry)")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), whose writes fail with ENOSPC")
def test_a_full_disk_under_tensorboard_is_a_warning_line_not_a_traceback(capsys, caplog, tmp_path, monkeypatch):
    # TensorBoard writes its events from a thread of its own. On a full disk that thread's traceback stays off the
    # terminal (main.py installs the hook) and closing the class folder's writer, which raises the thread's error
    # again, warns in one line: the error that counts (a checkpoint that could not be written) is reported by main.
    import threading

    import utils

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # Python's own (pytest's is in place)
    utils.quiet_tensorboard_thread_errors()
    utils.quiet_tensorboard_thread_errors()  # twice: still one hook
    import backbones

    cpu = torch.device("cpu")
    model = glass.GLASS(cpu)
    model.load(backbones.load("efficientnet_lite0"), ["blocks.2"], cpu, (3, 64, 64), 32, 32, dsc_hidden=16)
    model.tb_dir = str(tmp_path / "tb")
    events = model.tb_writer._get_file_writer().event_writer._async_writer  # tensorboard 2.21's internals
    events._writer._writer = open("/dev/full", "wb", buffering=0)
    model.tb_writer.add_scalar("train/loss", 1.0, 0)
    events._worker.join(timeout=10)  # the writer thread ends on the failed write
    assert not events._worker.is_alive()
    model.close()
    assert "Traceback" not in capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "TensorBoard log in" in warnings[0] and "No space left on device" in warnings[0]
    assert model._writer is None

"""`python main.py predict`: scoring new images with a saved checkpoint, thresholds, and reference checkpoints."""
import csv
import json
import os
import shutil
import subprocess
import sys
from collections import OrderedDict

import cv2
import numpy as np
import PIL.Image
import pytest
import torch

from conftest import ROOT, awkward_inputs, run_main

import glass
import metrics
import utils
from datasets import inputs as image_inputs
from datasets.mvtec import DatasetSplit, MVTecDataset


@pytest.fixture(scope="module")
def results(trained_tire, tmp_path_factory):
    """A results folder holding a copy of the trained tire class (so threshold.json stays out of the shared run)."""
    copy = tmp_path_factory.mktemp("predict_results")
    shutil.copytree(trained_tire / "models" / "backbone_0" / "mvtec_tire", copy / "models" / "backbone_0" / "mvtec_tire",
                    ignore=shutil.ignore_patterns("tb"))
    return copy


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_predict_a_folder_calibrates_and_writes_csv_and_pngs(results, tiny_tire, tmp_path):
    class_dir = results / "models" / "backbone_0" / "mvtec_tire"
    test_dir = tiny_tire / "tire" / "test"
    out = tmp_path / "out"
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--output", out, test_dir]) == 0

    # threshold.json: chosen on the test set, saying how and for which checkpoint.
    record = json.loads((class_dir / "threshold.json").read_text())
    model, _ = glass.load_trained(str(class_dir))
    assert record["checkpoint"] == model.checkpoint_path.split("/")[-1]
    assert "compute_best_threshold" in record["method"] and record["test_images"] == 18 and record["test_anomalous"] == 12

    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 18 and list(rows[0]) == glass.PREDICTION_COLUMNS
    scores = np.array([float(row["score"]) for row in rows])
    labels = np.array([int("/good/" not in row["image"]) for row in rows])
    # The inputs are the test set itself, so the stored threshold is the F1-best one of these scores ...
    assert record["threshold"] == pytest.approx(metrics.compute_best_threshold(labels, scores), abs=1e-7)
    # ... every decision follows from score and threshold ...
    for row in rows:
        assert float(row["threshold"]) == record["threshold"]
        assert row["anomalous"] == str(int(float(row["score"]) >= record["threshold"]))
    # ... and the scores are those of the test transform used in training.
    data = MVTecDataset(str(tiny_tire), str(tiny_tire), classname="tire", resize=64, imagesize=64, split=DatasetSplit.TEST)
    expected, _ = model._predict(torch.stack([data[i]["image"] for i in range(len(data))]))
    assert [row["image"] for row in rows] == [item[2] for item in data.data_to_iterate]
    assert np.abs(scores - np.asarray(expected)).max() < 1e-5  # batches of 8 vs 18: rounding only

    names = {row["heatmap"] for row in rows} | {row["overlay"] for row in rows}
    assert len(names) == 36  # test/good/000.png and test/hole/000.png get distinct names
    for name in names:
        picture = cv2.imread(name)
        assert picture is not None and picture.shape == (64, 64, 3) and picture.std() > 0


def test_threshold_from_option_file_or_recalibration(results, tiny_tire, tmp_path):
    class_dir = results / "models" / "backbone_0" / "mvtec_tire"
    images = [str(p) for p in sorted((tiny_tire / "tire" / "test" / "good").glob("*.png"))[:2]]
    threshold_file = class_dir / "threshold.json"
    if not threshold_file.exists():
        assert run_main(["--results_path", results, "predict", "-d", "tire", "--output", tmp_path / "a", *images]) == 0
    calibrated = json.loads(threshold_file.read_text())

    # --threshold wins and leaves threshold.json alone.
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "0.25", "--output", tmp_path / "b", *images]) == 0
    assert {row["threshold"] for row in read_csv(tmp_path / "b" / "predictions.csv")} == {"0.25"}
    assert json.loads(threshold_file.read_text()) == calibrated

    # A stored threshold is used as it is (here one edited by hand) ...
    threshold_file.write_text(json.dumps({**calibrated, "threshold": 0.99}))
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--output", tmp_path / "c", *images]) == 0
    rows = read_csv(tmp_path / "c" / "predictions.csv")
    assert [row["threshold"] for row in rows] == ["0.99", "0.99"] and [row["anomalous"] for row in rows] == ["0", "0"]

    # ... also without the note of how it was chosen ...
    threshold_file.write_text(json.dumps({"threshold": 0.98, "checkpoint": calibrated["checkpoint"]}))
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--output", tmp_path / "e", *images]) == 0
    assert {row["threshold"] for row in read_csv(tmp_path / "e" / "predictions.csv")} == {"0.98"}

    # ... or one written by hand that names no checkpoint: predict keeps it, as the report and the export do ...
    by_hand = json.dumps({"threshold": 0.97})
    threshold_file.write_text(by_hand)
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--output", tmp_path / "f", *images]) == 0
    assert {row["threshold"] for row in read_csv(tmp_path / "f" / "predictions.csv")} == {"0.97"}
    assert threshold_file.read_text() == by_hand
    assert utils.report_threshold(str(class_dir), calibrated["checkpoint"], [0.1, 0.9], [0, 1]) == (0.97, "threshold.json")

    # ... until --calibrate chooses it again on the test set.
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--calibrate", "--output", tmp_path / "d", images[0]]) == 0
    assert json.loads(threshold_file.read_text())["threshold"] == calibrated["threshold"]


def test_a_threshold_that_cannot_be_kept_is_used_all_the_same(tmp_path, monkeypatch, caplog):
    def cannot_write(path, write, option="--results_path"):
        raise utils.GlassError(f"cannot write {path} (Read-only file system): check that path and its permissions")

    monkeypatch.setattr(utils, "atomic_write", cannot_write)
    record = {"threshold": 0.375, "method": "F1-best on the test set"}
    monkeypatch.setattr(glass, "calibrate_threshold", lambda model, loader: record)
    with caplog.at_level("WARNING"):
        assert glass.choose_threshold(object(), str(tmp_path), lambda: None, None, False) == record
    assert "(Read-only file system): check that path and its permissions; so the threshold 0.375000 chosen now is not " \
           "kept (the next predict chooses it again, or give --threshold 0.375000)" in caplog.text
    assert not (tmp_path / "threshold.json").exists()


@pytest.mark.parametrize("content, says", [
    ('{"threshold": "abc", "checkpoint": "CKPT"}', "the threshold 'abc' is not a finite number"),
    ('{"threshold": NaN, "checkpoint": "CKPT"}', "the threshold nan is not a finite number"),
    ('[0.5]', "holds a JSON list, not an object"),
    ('{"threshold": 0.5,', "the file is damaged"),
])
def test_a_damaged_threshold_file_is_one_line_saying_how_to_fix_it(results, tiny_tire, tmp_path, capsys, content, says):
    class_dir = results / "models" / "backbone_0" / "mvtec_tire"
    image = str(next((tiny_tire / "tire" / "test" / "good").glob("*.png")))
    checkpoint = next(class_dir.glob("ckpt_best_*.pth")).name
    threshold_file = class_dir / "threshold.json"
    saved = threshold_file.read_text() if threshold_file.exists() else None
    try:
        threshold_file.write_text(content.replace("CKPT", checkpoint))
        assert run_main(["--results_path", results, "predict", "-d", "tire", "--output", tmp_path, image]) == 2
        line = one_error_line(capsys)
        assert says in line and "delete it or rerun with --calibrate" in line
    finally:
        if saved is None:
            threshold_file.unlink()
        else:
            threshold_file.write_text(saved)


def test_predict_warns_about_images_of_more_than_8_bits(results, tiny_tire, tmp_path, caplog):
    source = sorted((tiny_tire / "tire" / "test" / "good").glob("*.png"))[0]
    wide = tmp_path / "in" / "wide.png"
    wide.parent.mkdir()
    cv2.imwrite(str(wide), cv2.imread(str(source), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257)  # 16-bit gray
    with caplog.at_level("WARNING"):
        assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5",
                         "--output", tmp_path / "out", wide, source]) == 0
    assert f"1 image(s) of more than 8 bits per pixel ({wide}): read as the reference reads images" in caplog.text


def test_calibration_record_has_the_f1_best_point_and_its_f1():
    class Scored:  # what calibrate_threshold reads of a model: predict's scores and labels
        checkpoint_path = "ckpt_best_4.pth"

        def predict(self, loader):
            return None, [4.0, 3.0, 2.0, 1.0], None, [1, 0, 0, 1], None

    record = glass.calibrate_threshold(Scored(), test_loader=[])
    # F1 ties (2/3) between thresholds 4 (P 1, R .5) and 1 (P .5, R 1) go to the lowest.
    assert (record["threshold"], record["precision"], record["recall"]) == (1.0, 0.5, 1.0)
    assert record["f1"] == pytest.approx(2 / 3) and record["checkpoint"] == "ckpt_best_4.pth"
    assert (record["test_images"], record["test_anomalous"]) == (4, 2)


def test_collect_images_takes_files_folders_and_patterns_but_not_hidden_files(tmp_path):
    for name in ("b.png", "a.JPG", "._a.png", "notes.txt", "sub/c.bmp", ".ipynb_checkpoints/a-checkpoint.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = image_inputs.collect_images([str(tmp_path), str(tmp_path / "b.png"), str(tmp_path / "*.JPG")])
    assert found == [str(tmp_path / "a.JPG"), str(tmp_path / "b.png"), str(tmp_path / "sub" / "c.bmp")]


def test_collect_images_leaves_out_the_heatmaps_and_overlays_of_the_output_folder(tmp_path):
    names = ("a.png", "b_heatmap.png", "out/a_heatmap.png", "out/a_overlay.png", "out/c.png", "out/sub/d_overlay.png")
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    out = tmp_path / "out"
    for module in (image_inputs, ort_script()):
        assert module.collect_images([str(tmp_path)]) == [str(tmp_path / name) for name in sorted(names)]
        kept = [str(tmp_path / name) for name in ("a.png", "b_heatmap.png", "out/c.png")]
        assert module.collect_images([str(tmp_path)], str(out)) == kept
        assert module.collect_images([str(tmp_path / "**" / "*.png")], str(out)) == kept
        # The output folder is the input folder: only its own heatmaps and overlays are left out.
        assert module.collect_images([str(out)], str(out)) == [str(out / "c.png")]
        # A file named on its own is an input, wherever it is.
        assert module.collect_images([str(out / "a_overlay.png")], str(out)) == [str(out / "a_overlay.png")]


def test_a_broken_link_given_as_input_is_named_as_one(tmp_path):
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    ort = ort_script()
    for module, error in ((image_inputs, utils.GlassError), (ort, ort.UsageError)):
        with pytest.raises(error, match=r"gone.png is a broken link \(to .*nowhere.png, which does not exist\)"):
            module.collect_images([str(tmp_path / "gone.png")])


def ort_script():
    """onnx/ort.py as a module (it has its own copy of collect_images, to run without torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ort_script", ROOT / "onnx" / "ort.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rerun_of_predict_does_not_score_its_own_outputs(results, tiny_tire, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sorted((tiny_tire / "tire" / "test" / "good").glob("*.png"))[:2]:
        shutil.copy(path, inputs)
    for out in (inputs / "out", inputs):  # below the inputs, and the input folder itself
        for _ in range(2):
            assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5", "--output", out,
                             inputs]) == 0
            rows = read_csv(out / "predictions.csv")
            assert sorted(os.path.basename(row["image"]) for row in rows) == sorted(p.name for p in inputs.glob("*.png")
                                                                                   if not p.stem.endswith(("_heatmap", "_overlay")))
            assert len(rows) == 2


def test_predict_reads_each_folder_once_and_writes_any_file_name(results, tiny_tire, tmp_path, capsys):
    inputs, not_utf8, long_name = awkward_inputs(next((tiny_tire / "tire" / "test" / "good").glob("*.png")), tmp_path)
    out = tmp_path / "out"
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5", "--output", out,
                     inputs]) == 0
    with open(out / "predictions.csv", newline="", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["image"] for row in rows) == sorted([str(not_utf8), str(long_name)])
    for row in rows:
        for png in (row["heatmap"], row["overlay"]):
            assert os.path.isfile(png) and cv2.imdecode(np.fromfile(png, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)
    assert len(os.fsencode(os.path.basename(rows[0]["heatmap"]))) <= 255
    assert os.path.basename([r for r in rows if r["image"] == str(long_name)][0]["heatmap"]).startswith("deep_xxx")

    blocked = tmp_path / "blocked"
    (blocked / os.path.basename(rows[0]["heatmap"])).mkdir(parents=True)
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5", "--output", blocked,
                     inputs]) == 2
    line = one_error_line(capsys)
    assert "cannot write" in line and "a file or folder of that name is in the way: move it or choose another --output" in line


def test_python_warnings_are_log_lines(results, tmp_path):
    big = tmp_path / "big.png"
    PIL.Image.new("L", (10_000, 10_000)).save(big)  # above Pillow's decompression-bomb warning limit
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--results_path", str(results), "predict", "-d", "tire",
                           "--threshold", "0.5", "--output", str(tmp_path / "out"), str(big)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "DecompressionBombWarning" in line]
    assert warnings and all(" WARNING py.warnings: " in line for line in warnings), done.stderr


def test_predict_mistakes_are_one_line_errors(results, tiny_tire, tmp_path, capsys):
    image = str(next((tiny_tire / "tire" / "test" / "good").glob("*.png")))
    assert run_main(["--results_path", results, "predict", "-d", "bottle", image]) == 2
    assert "no trained class folder" in one_error_line(capsys)
    ghost = results / "models" / "backbone_0" / "mvtec_ghost"  # a run that stopped before its first epoch
    ghost.mkdir()
    (ghost / "config.json").write_text("{}")
    try:
        assert run_main(["--results_path", results, "predict", "-d", "tire", "--dataset", "custom", image]) == 2
        assert "(trained there: mvtec_tire, as <dataset>_<class>)" in one_error_line(capsys)
    finally:
        shutil.rmtree(ghost)
    untrained = results / "models" / "backbone_0" / "mvtec_untrained"  # what a failed --test test leaves
    (untrained / "tb").mkdir(parents=True)
    try:
        assert run_main(["--results_path", results, "predict", "-d", "untrained", image]) == 2
        assert f"no ckpt_best_*.pth in {untrained}: train this class first" in one_error_line(capsys)
    finally:
        shutil.rmtree(untrained)
    assert run_main(["--results_path", results, "predict", "-d", "tire", str(tmp_path / "*.png")]) == 2
    assert "matched no file" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert run_main(["--results_path", results, "predict", "-d", "tire", tmp_path / "empty"]) == 2
    assert "holds no images" in one_error_line(capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (broken / name).write_bytes(b"not an image")
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5", "--output",
                     tmp_path / "broken_out", broken / "a.png"]) == 2
    assert f"cannot read image {broken / 'a.png'} (" in one_error_line(capsys)
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5", "--output",
                     tmp_path / "broken_out", image, broken]) == 2
    assert (f"4 images cannot be read ({broken / 'a.png'}, {broken / 'b.png'}, {broken / 'c.png'}, ...): replace them, "
            "or leave them out of the inputs") in one_error_line(capsys)
    assert run_main(["--results_path", results, "predict", "-d", "tire", "-d", "bottle", image]) == 2
    assert "predict scores one class, not tire, bottle: give -d once" in one_error_line(capsys)
    for late in (["net", "-b", "resnet18"], ["predict", "-d", "tire", image]):  # swallowed as images by click
        assert run_main(["--results_path", results, "predict", "-d", "tire", image, *late]) == 2
        assert f"{late[0]} comes after predict's images: predict comes last, once" in one_error_line(capsys)
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5", "--calibrate", image]) == 2
    assert "not both" in one_error_line(capsys)
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "nan", image]) == 2
    assert "not a finite number" in one_error_line(capsys)
    assert run_main(["--results_path", results, "predict", "-d", "tire", image, "--threshold", "0.8"]) == 2
    assert ("--threshold comes after the images: give predict's options before its INPUTS, e.g. predict -d tire "
            f"--threshold ... {image}") in one_error_line(capsys)
    for late in (["--threshold=0.8"], ["--calibrate"], ["--help"]):
        assert run_main(["--results_path", results, "predict", "-d", "tire", image, *late]) == 2
        assert f"{late[0]} comes after the images: give predict's options before its INPUTS, e.g. predict -d tire " \
               f"{late[0]} {image}" in one_error_line(capsys)
    assert run_main(["--results_path", results, "predict", image, "-d", "tire"]) == 2
    assert "-d is a `predict` option: give it after `predict`, before the images" in capsys.readouterr().err


def test_checkpoint_in_the_reference_format_loads_and_scores_the_same(results, tiny_tire, dtd_root, tmp_path, capsys):
    """ckpt_best_<epoch>.pth as the reference writes it: {"discriminator", "pre_projection"} with its module names,
    in a class folder without config.json, which a test-only run with the training options records."""
    from conftest import TINY_NET, tiny_dataset_args

    class_dir = results / "models" / "backbone_0" / "mvtec_tire"
    ours, _ = glass.load_trained(str(class_dir))
    dsc, proj = ours.discriminator, ours.pre_projection
    linear, norm = dsc.body.block1[0], dsc.body.block1[1]
    reference = {
        "discriminator": OrderedDict([
            ("body.block1.0.weight", linear.weight), ("body.block1.0.bias", linear.bias),
            ("body.block1.1.weight", norm.weight), ("body.block1.1.bias", norm.bias),
            ("body.block1.1.running_mean", norm.running_mean), ("body.block1.1.running_var", norm.running_var),
            ("body.block1.1.num_batches_tracked", norm.num_batches_tracked),
            ("tail.0.weight", dsc.tail[0].weight),
        ]),
        "pre_projection": OrderedDict([
            ("layers.0fc.weight", proj.layers[0].weight), ("layers.0fc.bias", proj.layers[0].bias),
        ]),
    }
    reference = {part: OrderedDict((k, v.detach().clone()) for k, v in state.items()) for part, state in reference.items()}
    fresh = tmp_path / "reference_results" / "models" / "backbone_0" / "mvtec_tire"
    fresh.mkdir(parents=True)
    torch.save(reference, fresh / "ckpt_best_219.pth")
    image = str(next((tiny_tire / "tire" / "test" / "good").glob("*.png")))
    assert run_main(["--results_path", tmp_path / "reference_results", "predict", "-d", "tire", image]) == 2
    assert "has a best checkpoint but no config.json" in one_error_line(capsys)
    assert run_main(["--results_path", tmp_path / "reference_results", "--test", "test", *TINY_NET,
                     *tiny_dataset_args(tiny_tire, dtd_root)]) == 0
    recorded = json.loads((fresh / "config.json").read_text())
    assert recorded.pop(glass.RECORDED_BY_TEST) is True
    assert recorded == json.loads((class_dir / "config.json").read_text())

    loaded, _ = glass.load_trained(str(fresh))
    assert loaded.checkpoint_path.endswith("ckpt_best_219.pth")
    data = MVTecDataset(str(tiny_tire), str(tiny_tire), classname="tire", resize=64, imagesize=64, split=DatasetSplit.TEST)
    images = torch.stack([data[i]["image"] for i in (0, 6, 12, 17)])
    (ref_scores, ref_maps), (our_scores, our_maps) = loaded._predict(images), ours._predict(images)
    assert np.array_equal(np.asarray(ref_scores), np.asarray(our_scores))
    assert all(np.array_equal(a, b) for a, b in zip(ref_maps, our_maps))

    # The predict command takes it as it is.
    out = tmp_path / "out"
    assert run_main(["--results_path", tmp_path / "reference_results", "predict", "-d", "tire", "--threshold", "0.5",
                     "--output", out, data.data_to_iterate[0][2]]) == 0
    [row] = read_csv(out / "predictions.csv")
    assert float(row["score"]) == pytest.approx(float(our_scores[0]), abs=1e-5)  # batch 1 vs 4: rounding only


def test_chained_predict_scores_with_the_class_just_trained_and_checks_its_inputs_first(tiny_tire, dtd_root, tmp_path,
                                                                                       capsys):
    from conftest import TINY_NET, tiny_dataset_args

    net = [*TINY_NET[:TINY_NET.index("--meta_epochs")], "--meta_epochs", "1", "--step", "2", "--limit", "8"]
    data = tiny_dataset_args(tiny_tire, dtd_root)
    data[data.index("mvtec")] = "custom"  # another dataset name than predict's default (mvtec)
    images = tiny_tire / "tire" / "test" / "good"
    results = tmp_path / "typo"
    assert run_main(["--results_path", results, *net, *data, "predict", "-d", "tire", tmp_path / "no_such_folder"]) == 2
    assert "matched no file" in one_error_line(capsys)
    assert not list(results.rglob("*.pth"))  # refused before training
    assert run_main(["--results_path", results, *net, *data, "predict", "-d", "bottle", images]) == 2
    assert "neither trained by this run (custom: tire)" in one_error_line(capsys)

    results = tmp_path / "chained"
    assert run_main(["--results_path", results, *net, *data, "predict", "-d", "tire", images]) == 0
    rows = read_csv(results / "predict" / "custom_tire" / "predictions.csv")
    assert len(rows) == len(list(images.glob("*.png")))
    assert (results / "models" / "backbone_0" / "custom_tire" / "threshold.json").is_file()


def test_load_trained_loads_the_checkpoint_it_is_given(trained_tire, tmp_path):
    class_dir = trained_tire / "models" / "backbone_0" / "mvtec_tire"
    other = tmp_path / "ckpt_best_99.pth"
    shutil.copy(next(class_dir.glob("ckpt_best_*.pth")), other)
    model, _ = glass.load_trained(str(class_dir), checkpoint=str(other))
    assert model.checkpoint_path == str(other)


def test_predict_images_prepares_images_as_the_training_test_set_did(tmp_path, tiny_tire):
    """resize_used (e.g. 329/288 of --imagesize for wood and toothbrush), not --resize; score == threshold is anomalous."""
    from torchvision import transforms

    image = str(next((tiny_tire / "tire" / "test" / "good").glob("*.png")))

    class Capture:
        def _predict(self, images):
            self.images = images
            return [0.5] * len(images), [np.zeros((64, 64))] * len(images)

    model = Capture()
    config = {"input_shape": [3, 64, 64], "dataset": {"resize": 64, "imagesize": 64, "resize_used": 80,
                                                       "imagesize_used": 64}}
    rows = glass.predict_images(model, config, [image], str(tmp_path / "out"), threshold=0.5)
    expected = transforms.Compose([transforms.Resize(80), transforms.CenterCrop(64), transforms.ToTensor(),
                                   transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])(
        PIL.Image.open(image).convert("RGB"))
    assert torch.allclose(model.images[0], expected)
    assert rows[0]["anomalous"] == "1"


def test_predict_says_how_many_images_are_anomalous_and_uses_data_path(trained_tire, tiny_tire, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(trained_tire / "models", results / "models", ignore=shutil.ignore_patterns("tb"))
    images = [str(p) for p in sorted((tiny_tire / "tire" / "test" / "good").glob("*.png"))[:2]]
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold=-1e9", *images]) == 0
    assert "mvtec_tire: 2 of 2 image(s) anomalous at threshold" in capsys.readouterr().out
    nowhere = tmp_path / "nowhere"
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--calibrate", "--data_path", nowhere,
                     images[0]]) == 2
    assert f"the test set to choose a threshold on is not at {nowhere}" in capsys.readouterr().err


def test_an_input_file_named_like_an_option_is_an_input(trained_tire, tiny_tire, tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(trained_tire / "models", results / "models", ignore=shutil.ignore_patterns("tb"))
    image = next((tiny_tire / "tire" / "test" / "good").glob("*.png"))
    monkeypatch.chdir(tmp_path)
    shutil.copy(image, tmp_path / "--threshold=0.5.png")
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--threshold", "0.5", "--output", "out",
                     image, "--threshold=0.5.png"]) == 0
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        assert [row["image"] for row in csv.DictReader(handle)] == [str(image), "--threshold=0.5.png"]


def test_a_threshold_of_true_is_not_a_number(tmp_path):
    (tmp_path / "threshold.json").write_text('{"threshold": true}')
    with pytest.raises(utils.GlassError, match="the threshold True is not a finite number"):
        utils.read_threshold_file(str(tmp_path / "threshold.json"))


def test_backbone_index_chooses_the_backbone_folder(trained_tire, tiny_tire, tmp_path, capsys, caplog):
    """`predict --backbone_index 1` reads models/backbone_1/ (a run with several -b); the default index 0 reads
    backbone_0, which this results folder lacks."""
    results = tmp_path / "results"
    shutil.copytree(trained_tire / "models" / "backbone_0" / "mvtec_tire", results / "models" / "backbone_1" / "mvtec_tire",
                    ignore=shutil.ignore_patterns("tb"))
    image = sorted((tiny_tire / "tire" / "test" / "cut").iterdir())[0]
    out = tmp_path / "out"
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--backbone_index", "1", "--output", out,
                     image]) == 0
    [row] = read_csv(out / "predictions.csv")
    assert row["image"].endswith(image.name) and 0.0 <= float(row["score"]) <= 1.0
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--output", tmp_path / "none", image]) == 2
    assert "backbone_0" in one_error_line(capsys)
    # Its default output folder is its own, beside backbone_0's predict/mvtec_tire.
    caplog.set_level("INFO")
    assert run_main(["--results_path", results, "predict", "-d", "tire", "--backbone_index", "1", image]) == 0
    assert [p.name for p in (results / "predict").iterdir()] == ["mvtec_tire_backbone_1"]
    assert f"Scoring 1 image(s) into {results / 'predict' / 'mvtec_tire_backbone_1'}" in caplog.text  # a bar on a terminal


def test_a_class_folder_copied_from_another_class_is_named_when_loaded(trained_tire, tmp_path, caplog):
    source = trained_tire / "models" / "backbone_0" / "mvtec_tire"
    copied = tmp_path / "mvtec_cable"
    shutil.copytree(source, copied, ignore=shutil.ignore_patterns("tb"))
    glass.load_trained(str(source))
    assert "copied or renamed" not in caplog.text
    glass.load_trained(str(copied))
    assert f"{copied} holds a model trained as mvtec_tire (its config.json): a copied or renamed folder?" in caplog.text

"""ONNX export (onnx/pth2onnx.py) and onnxruntime inference (onnx/ort.py) against PyTorch on real tire images."""
import ast
import csv
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import cv2
import numpy as np
import onnx
import onnxruntime
import PIL.Image
import pytest
import scipy.ndimage as ndimage
import torch
import torch.nn.functional as F

from conftest import ROOT, awkward_inputs

import glass
from datasets import LOADERS
from datasets import inputs as image_inputs
from datasets.mvtec import DatasetSplit, MVTecDataset
from utils import GlassError

TOLERANCE = 1e-4


def load_script(name):
    """Import onnx/<name>.py under another module name (the folder must not shadow the onnx package)."""
    spec = importlib.util.spec_from_file_location(f"glass_onnx_{name}", ROOT / "onnx" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pth2onnx = load_script("pth2onnx")
glass_graph = load_script("glass_graph")
ort_script = load_script("ort")


@pytest.fixture(scope="module")
def class_dir(trained_tire, tmp_path_factory):
    """A copy of the trained tire class folder (checkpoint + config.json), so that exports stay out of the shared run."""
    source = trained_tire / "models" / "backbone_0" / "mvtec_tire"
    target = tmp_path_factory.mktemp("onnx_results") / "models" / "backbone_0" / "mvtec_tire"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("tb"))
    return target


@pytest.fixture(scope="module")
def exported(class_dir):
    """glass.onnx exported through the command line from --results_path and -d."""
    results = class_dir.parents[2]
    assert pth2onnx.main(["--results_path", str(results), "-d", "tire"]) == 0
    path = class_dir / "glass.onnx"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def model(class_dir):
    return glass.load_trained(str(class_dir))[0]


@pytest.fixture(scope="module")
def test_images(tiny_tire, dtd_root):
    """The 18 real tire test images through the test transform of training, and their paths."""
    data = MVTecDataset(str(tiny_tire), str(dtd_root), classname="tire", resize=64, imagesize=64, split=DatasetSplit.TEST)
    items = [data[i] for i in range(len(data))]
    return torch.stack([item["image"] for item in items]), [item["image_path"] for item in items]


def test_upsampling_and_smoothing_equal_torch_and_scipy_including_reflect_borders():
    rng = np.random.default_rng(0)
    for grid, size in (((8, 8), (64, 64)), ((3, 5), (10, 37))):  # 10 < kernel radius 16: reflection folds more than once
        scores = rng.random((2, *grid)).astype(np.float32)
        maps = glass_graph.UpsampleAndSmooth(grid, size, sigma=4)(torch.from_numpy(scores)).numpy()
        upsampled = F.interpolate(torch.from_numpy(scores).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        expected = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in upsampled.squeeze(1).numpy()])
        assert maps.shape == (2, *size) and np.abs(maps - expected).max() < 1e-6


@pytest.mark.parametrize("in_len,out_len", [(360, 128), (9216, 1536), (100, 7), (24, 128), (256, 128)])
def test_adaptive_pooling_equals_torch(in_len, out_len):
    rows = torch.randn(5, in_len)
    expected = F.adaptive_avg_pool1d(rows.unsqueeze(1), out_len).squeeze(1)
    assert torch.allclose(glass_graph.AdaptiveAvgPool1d(in_len, out_len)(rows), expected, atol=1e-6)


def test_export_metadata_and_dynamic_batch(exported):
    proto = onnx.load(str(exported))
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    assert meta["input_shape"] == "3,64,64" and meta["resize"] == "64" and meta["imagesize"] == "64,64"
    assert meta["mean"] == "0.485,0.456,0.406" and meta["std"] == "0.229,0.224,0.225"
    assert meta["backbone"] == "efficientnet_lite0" and meta["layers"] == "blocks.2,blocks.4"
    assert meta["class"] == "tire" and meta["dataset"] == "mvtec" and meta["checkpoint"].startswith("ckpt_best_")
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    [image] = session.get_inputs()
    assert image.name == "image" and isinstance(image.shape[0], str) and image.shape[1:] == [3, 64, 64]
    assert [o.name for o in session.get_outputs()] == ["image_score", "anomaly_map"]


def test_onnxruntime_equals_pytorch_on_real_images(exported, model, test_images):
    images, _ = test_images
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images[5:6], images):  # batch 1 twice, then all 18 at once
        scores, maps = session.run(None, {"image": batch.numpy()})
        ref_scores, ref_maps = model._predict(batch)
        assert scores.shape == (len(batch),) and maps.shape == (len(batch), 64, 64)
        assert np.abs(scores - np.asarray(ref_scores)).max() < TOLERANCE
        assert np.abs(maps - np.stack(ref_maps)).max() < TOLERANCE
        assert maps.std() > 0  # a real map, not a constant


def test_ort_script_reads_images_of_more_than_8_bits_as_training_with_a_warning(exported, test_images, tmp_path,
                                                                                caplog):
    import datasets.base

    assert ort_script.WIDE_MODES == datasets.base.WIDE_MODES  # the standalone script keeps its own copy
    _, paths = test_images
    wide = tmp_path / "wide.png"
    cv2.imwrite(str(wide), cv2.imread(paths[0], cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257)
    meta = ort_script.read_metadata(onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"]))
    with caplog.at_level("WARNING"):
        _, crop = ort_script.preprocess(str(wide), meta)
    assert f"{wide} has more than 8 bits per pixel (I;16)" in caplog.text and (crop == 255).mean() > 0.9


def test_ort_script_takes_the_same_inputs_as_predict_and_writes_the_same_columns(tmp_path):
    """The standalone script's copies of the project's image rules agree with the project's."""
    import datasets.base

    assert ort_script.IMAGE_EXTENSIONS == datasets.base.IMAGE_EXTENSIONS
    assert ort_script.CSV_COLUMNS == glass.PREDICTION_COLUMNS
    for name in ("a.png", "b.JPG", "c.tiff", "._a.png", ".hidden.png", "notes.txt", "d.webp"):
        assert ort_script.is_image(name) == datasets.base.is_image(name), name
    for folder in ("x", "y/z"):
        (tmp_path / folder).mkdir(parents=True)
        for name in ("a.png", "b.JPG", "._a.png", "notes.txt"):
            (tmp_path / folder / name).write_bytes(b"")
    inputs = [str(tmp_path / "x"), str(tmp_path / "y" / "**" / "*.png"), str(tmp_path / "x" / "a.png")]
    found = image_inputs.collect_images(inputs)
    assert ort_script.collect_images(inputs) == found and len(found) == 3
    assert ort_script.output_stems(found) == image_inputs.output_stems(found) == ["x_a", "x_b", "y_z_a"]
    for make_error in (image_inputs.collect_images, ort_script.collect_images):
        with pytest.raises(Exception, match="matched no file"):
            make_error([str(tmp_path / "nothing*.png")])


def test_ort_script_alone_preprocesses_like_training_and_writes_outputs(exported, model, test_images, tiny_tire, tmp_path):
    # Deployable alone: it imports nothing from this repository ...
    tree = ast.parse((ROOT / "onnx" / "ort.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    optional = {"tqdm"}  # the progress bar on a terminal, where it is installed (else log lines)
    assert imported <= {"__future__", "argparse", "csv", "glob", "hashlib", "logging", "os", "sys", "time", "typing",
                        "cv2", "numpy", "onnxruntime", "PIL", *optional}

    # ... its preprocessing is the test transform of training (bit for bit) ...
    images, paths = test_images
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    meta = ort_script.read_metadata(session)
    for i in (0, 7, 17):
        tensor, crop = ort_script.preprocess(paths[i], meta)
        assert np.array_equal(tensor, images[i].numpy()) and crop.shape == (64, 64, 3)

    # ... and run as a copied file in a fresh process, it scores a folder like PyTorch does.
    shutil.copy(ROOT / "onnx" / "ort.py", tmp_path / "ort.py")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "ort.py", str(exported), str(tiny_tire / "tire" / "test"), "-o", str(out), "--batch_size", "5",
         "--threshold", "0.6"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image"] for row in rows] == paths
    ref_scores, _ = model._predict(images)
    assert np.abs(np.array([float(r["score"]) for r in rows]) - np.asarray(ref_scores)).max() < TOLERANCE
    assert all(row["anomalous"] == str(int(float(row["score"]) >= 0.6)) for row in rows)
    for row in rows:
        for key in ("heatmap", "overlay"):
            picture = cv2.imread(row[key])
            assert picture is not None and picture.shape == (64, 64, 3) and picture.std() > 0

    bad = subprocess.run([sys.executable, "ort.py", str(exported), str(tmp_path / "none" / "*.png")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("Error:") and len(bad.stderr.strip().splitlines()) == 1


def test_bare_reference_checkpoint_exports_with_options(class_dir, model, test_images, tiny_tire, tmp_path, capsys,
                                                        caplog):
    """A checkpoint without config.json: the model options on the command line, trained sizes read from it."""
    bare = tmp_path / "ckpt_best_219.pth"
    shutil.copy(model.checkpoint_path, bare)
    options = ["-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--imagesize", "64", "--resize", "64",
               "--pretrain_embed_dimension", "128", "--class_name", "tire"]
    assert pth2onnx.main(["--checkpoint", str(bare), *options, "--no_check"]) == 0
    assert "No threshold embedded" in capsys.readouterr().out  # no threshold.json beside the bare checkpoint
    # The option left out (the paper's --patchsize 3 is the one this model was trained with) is named.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "the paper's are used: --patchsize 3. Give the values" in warnings[0]
    image = str(next((tiny_tire / "tire" / "test" / "good").glob("*.png")))
    assert ort_script.main([str(tmp_path / "glass.onnx"), image, "-o", str(tmp_path / "out"), "--no_images"]) == 0
    assert "no threshold in the model: pass --threshold" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "glass.onnx"), providers=["CPUExecutionProvider"])
    images, _ = test_images
    scores, _ = session.run(None, {"image": images[:4].numpy()})
    assert np.abs(scores - np.asarray(model._predict(images[:4])[0])).max() < TOLERANCE

    # Model options next to a config.json are refused, in one line.
    capsys.readouterr()
    assert pth2onnx.main(["--class_dir", str(class_dir), "-b", "resnet18", "--no_check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: --backbone")
    assert pth2onnx.main(["--results_path", str(tmp_path), "-d", "tire"]) == 2
    assert capsys.readouterr().err.strip().startswith("Error: class folder")
    results = class_dir.parents[2]
    assert pth2onnx.main(["--results_path", str(results), "-d", "tire", "--dataset", "mvtec3d"]) == 2
    assert "mvtec3d_tire does not exist (trained there: mvtec_tire, as <dataset>_<class>)" in capsys.readouterr().err
    untrained = results / "models" / "backbone_0" / "mvtec_untrained"
    (untrained / "tb").mkdir(parents=True)
    assert pth2onnx.main(["--class_dir", str(untrained)]) == 2
    assert f"no ckpt_best_*.pth in {untrained}: train this class first" in capsys.readouterr().err
    # The results folder given as the class folder, and a class folder given as the checkpoint.
    assert pth2onnx.main(["--class_dir", str(results)]) == 2
    assert f"{results} is a results folder, not a class folder: give --results_path {results} -d CLASS" in \
        capsys.readouterr().err
    assert pth2onnx.main(["--checkpoint", str(class_dir)]) == 2
    assert f"checkpoint {class_dir} is a folder: give a ckpt_best_<epoch>.pth in it, or the folder as --class_dir" in \
        capsys.readouterr().err
    # The last epoch's training state exports as asked, with a word that it is not the best checkpoint.
    caplog.clear()
    assert pth2onnx.main(["--checkpoint", str(class_dir / "ckpt.pth"), "-o", str(tmp_path / "last.onnx"), "--no_check"]) == 0
    assert "ckpt.pth holds the weights of the last epoch trained, not of the best one" in caplog.text


def test_stored_threshold_of_the_same_checkpoint_goes_into_the_metadata(tmp_path):
    (tmp_path / "threshold.json").write_text('{"threshold": 0.42, "checkpoint": "ckpt_best_3.pth"}')
    assert pth2onnx.stored_threshold_value(str(tmp_path), str(tmp_path / "ckpt_best_3.pth")) == 0.42
    assert pth2onnx.stored_threshold_value(str(tmp_path), str(tmp_path / "ckpt_best_4.pth")) is None  # made for another one
    (tmp_path / "threshold.json").write_text('{"threshold": "abc", "checkpoint": "ckpt_best_3.pth"}')
    with pytest.raises(GlassError, match="the threshold 'abc' is not a finite number: fix it, delete it or rerun with --calibrate"):
        pth2onnx.stored_threshold_value(str(tmp_path), str(tmp_path / "ckpt_best_3.pth"))
    config = {"backbone": "resnet18", "layers_to_extract_from": ["layer2"], "input_shape": [3, 32, 32],
              "dataset": {"resize_used": [40, 40]}}
    meta = pth2onnx.export_metadata(config, "ckpt_best_3.pth", 0.42)
    assert meta["threshold"] == "0.42" and meta["resize"] == "40,40" and meta["imagesize"] == "32,32"


@pytest.mark.parametrize("name, layers", [
    ("vit_small", ["blocks.4", "blocks.8"]),  # token layers, a class token before the patch tokens
    ("vit_swin_base", ["layers.1", "layers.2"]),  # (B, H, W, C) stages
])
def test_transformer_backbone_exports_and_matches_pytorch(test_images, tmp_path, name, layers):
    """Transformer layer outputs through the export: ONNX equals GLASS._predict."""
    import backbones

    torch.manual_seed(0)
    model = glass.GLASS(torch.device("cpu"))
    model.load(backbones.load(name, pretrained=False), layers, torch.device("cpu"), (3, 224, 224), 64, 64,
               dsc_hidden=64)
    model._eval_mode()
    config = {"input_shape": [3, 224, 224], "backbone": name, "layers_to_extract_from": layers}
    path = tmp_path / f"{name}.onnx"
    pth2onnx.export(model, config, str(path))
    images = F.interpolate(test_images[0][:2], size=(224, 224), mode="bilinear", align_corners=False)
    scores, maps = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": images.numpy()})
    ref_scores, ref_maps = model._predict(images)
    assert maps.shape == (2, 224, 224) and maps.std() > 0
    assert np.abs(scores - np.asarray(ref_scores)).max() < TOLERANCE
    assert np.abs(maps - np.stack(ref_maps)).max() < TOLERANCE


def one_error_line(capsys) -> str:
    """The single stderr line of a refused command."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def test_opset_the_exporter_cannot_write_is_refused_before_anything_is_written(class_dir, tmp_path, capsys, monkeypatch):
    low, high = pth2onnx.supported_opsets()
    assert low == pth2onnx.OPSET == 18 and high >= 23  # torch's own opset, up to onnx's version converter
    results = str(class_dir.parents[2])
    for opset in (99, high + 1, 5, low - 1):
        target = tmp_path / f"y{opset}.onnx"
        assert pth2onnx.main(["--results_path", results, "-d", "tire", "--opset", str(opset), "-o", str(target)]) == 2
        line = one_error_line(capsys)
        assert f"--opset {opset} " in line and f"choose {low} to {high}" in line
        assert not target.exists()

    # A supported opset other than the default is the one written.
    target = tmp_path / "y19.onnx"
    assert pth2onnx.main(["--results_path", results, "-d", "tire", "--opset", "19", "-o", str(target), "--no_check"]) == 0
    assert [(e.domain, e.version) for e in onnx.load(str(target)).opset_import if e.domain in ("", "ai.onnx")] == [("", 19)]

    # Were the range check bypassed, torch would keep opset 18 for 17 (no Pad adapter, after its own warnings):
    # refused, nothing written.
    monkeypatch.setattr(pth2onnx, "check_opset", lambda opset: None)
    target = tmp_path / "y17.onnx"
    assert pth2onnx.main(["--results_path", results, "-d", "tire", "--opset", "17", "-o", str(target), "--no_check"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("Error: the exporter wrote opset 18 instead of --opset 17")
    assert not target.exists()


def test_output_naming_a_directory_is_refused(class_dir, tmp_path, capsys):
    results = str(class_dir.parents[2])
    for output in (str(tmp_path), str(tmp_path / "new") + "/"):
        assert pth2onnx.main(["--results_path", results, "-d", "tire", "-o", output]) == 2
        line = one_error_line(capsys)
        assert "names a directory" in line and "glass.onnx" in line
    assert list(tmp_path.iterdir()) == []


def test_output_over_a_file_that_is_not_onnx_is_refused(class_dir, tmp_path, capsys):
    checkpoint = next(class_dir.glob("ckpt_best_*.pth"))
    before = checkpoint.read_bytes()
    assert pth2onnx.main(["--class_dir", str(class_dir), "-o", str(checkpoint), "--no_check"]) == 2
    assert "would overwrite a file that is not an ONNX model" in one_error_line(capsys)
    assert checkpoint.read_bytes() == before
    notes = tmp_path / "notes.onnx"  # the right name, but not a model
    notes.write_text("my notes\n")
    assert pth2onnx.main(["--class_dir", str(class_dir), "-o", str(notes), "--no_check"]) == 2
    assert "would overwrite a file that is not an ONNX model" in one_error_line(capsys)
    assert notes.read_text() == "my notes\n"
    # An earlier export is replaced.
    assert pth2onnx.main(["--class_dir", str(class_dir), "-o", str(tmp_path / "glass.onnx"), "--no_check"]) == 0
    assert pth2onnx.main(["--class_dir", str(class_dir), "-o", str(tmp_path / "glass.onnx"), "--no_check"]) == 0


def test_bare_checkpoint_options_and_files_are_checked_first(class_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:  # argparse: exit code 2 and its usage line
        pth2onnx.main(["--checkpoint", str(next(class_dir.glob("ckpt_best_*.pth"))), "--resize", "-5"])
    assert done.value.code == 2 and "-5 is below 1" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    assert pth2onnx.main(["--class_dir", str(class_dir), "--checkpoint", str(notes), "--no_check"]) == 2
    line = one_error_line(capsys)
    assert "cannot read checkpoint" in line and "give a ckpt_best_<epoch>.pth written by GLASS" in line
    foreign = tmp_path / "foreign.pth"
    with open(foreign, "wb") as handle:
        pickle.dump({"a": 1}, handle, protocol=4)  # torch's loader warns about the protocol before it refuses
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pth2onnx.main(["--class_dir", str(class_dir), "--checkpoint", str(foreign), "--no_check"]) == 2
    assert "cannot read checkpoint" in one_error_line(capsys) and not caught


@pytest.mark.parametrize("option, says", [
    (["--patchsize", "4"], "argument --patchsize: 4 is even: the patch grid keeps the layer's size only with an odd "
                           "patch size (3)"),
    (["--imagesize", "60"], "--imagesize 60 is not a multiple of the feature stride of layer blocks.2 (its feature "
                            "grid is 8x8)"),
])
def test_bare_checkpoint_options_that_main_refuses_are_refused(class_dir, tmp_path, capsys, option, says):
    """main.py trains no model with an even --patchsize or an --imagesize off the feature stride: none is exported."""
    bare = tmp_path / "ckpt_best_219.pth"
    shutil.copy(next(class_dir.glob("ckpt_best_*.pth")), bare)
    options = ["-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--imagesize", "64", "--resize", "64",
               "--pretrain_embed_dimension", "128", "--patchsize", "3", *option]  # the last of an option counts
    try:
        code = pth2onnx.main(["--checkpoint", str(bare), *options, "--no_check"])
    except SystemExit as done:  # argparse's option errors
        code = done.code
    assert code == 2 and says in one_error_line(capsys)
    assert not (tmp_path / "glass.onnx").exists()


def test_help_names_every_dataset_of_main(capsys):
    with pytest.raises(SystemExit) as done:
        pth2onnx.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"({', '.join(sorted(LOADERS))})" in text


@pytest.mark.parametrize("arguments, code", [(["--help"], 0), (["--imagesize", "-5"], 2)])
def test_help_and_option_mistakes_answer_without_importing_torch(arguments, code):
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['pth2onnx.py', *{arguments!r}]\n"
        "try:\n"
        "    runpy.run_path('onnx/pth2onnx.py', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    print('exit', done.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == f"exit {code} False", done.stderr


def edited_export(exported, path, metadata=None, outputs=None):
    """A copy of ``exported`` with some metadata values replaced, or a one-node graph carrying its metadata."""
    proto = onnx.load(str(exported))
    if outputs is not None:
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["image"], [outputs])], "other", list(proto.graph.input),
            [onnx.helper.make_tensor_value_info(outputs, onnx.TensorProto.FLOAT, ["batch", 3, 64, 64])])
        other = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import))
        other.ir_version = proto.ir_version
        other.metadata_props.extend(proto.metadata_props)
        proto = other
    values = {**{entry.key: entry.value for entry in proto.metadata_props}, **(metadata or {})}
    del proto.metadata_props[:]
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def test_ort_refuses_a_file_that_is_not_a_usable_glass_export(exported, tiny_tire, tmp_path, capsys):
    images = str(tiny_tire / "tire" / "test" / "good")
    models = [
        edited_export(exported, tmp_path / "resize.onnx", metadata={"resize": "abc"}),
        edited_export(exported, tmp_path / "std.onnx", metadata={"std": "0,0,0"}),
        edited_export(exported, tmp_path / "threshold.onnx", metadata={"threshold": "nan"}),
        edited_export(exported, tmp_path / "crop.onnx", metadata={"imagesize": "32,32"}),  # the graph takes 64 px
        edited_export(exported, tmp_path / "outputs.onnx", outputs="features"),
    ]
    for model in models:
        assert ort_script.main([str(model), images, "-o", str(tmp_path / "out")]) == 2
        line = one_error_line(capsys)
        assert f"{model} is not a usable GLASS export" in line and "export it again with onnx/pth2onnx.py" in line
    assert not (tmp_path / "out").exists()


def test_ort_refuses_a_threshold_that_is_not_a_number(exported, tiny_tire, tmp_path, capsys):
    images = str(tiny_tire / "tire" / "test" / "good")
    for value in ("nan", "inf", "-inf"):
        assert ort_script.main([str(exported), images, "-o", str(tmp_path / "out"), f"--threshold={value}"]) == 2
        assert "is not a finite number" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_ort_refuses_an_image_too_elongated_to_resize(exported, tmp_path, capsys):
    import datasets.base

    thin = tmp_path / "thin.png"
    PIL.Image.new("L", (3_000_000, 1), 128).save(thin)
    assert ort_script.main([str(exported), str(thin), "-o", str(tmp_path / "out")]) == 2
    assert "thin.png is 3000000x1 pixels: resized it would take 12288 million pixels; crop it" in one_error_line(capsys)
    assert ort_script.MAX_RESIZED_PIXELS == datasets.base.MAX_RESIZED_PIXELS


def test_ort_names_unreadable_images_as_predict_does(exported, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.png"):
        (broken / name).write_bytes(b"not an image")
    assert ort_script.main([str(exported), str(broken / "a.png"), "-o", str(tmp_path / "out")]) == 2
    assert f"cannot read image {broken / 'a.png'} (" in one_error_line(capsys)
    assert ort_script.main([str(exported), str(broken), "-o", str(tmp_path / "out")]) == 2
    assert (f"2 images cannot be read ({broken / 'a.png'}, {broken / 'b.png'}): replace them, or leave them out of "
            "the inputs") in one_error_line(capsys)


def test_ort_reads_each_folder_once_and_writes_any_file_name(exported, tiny_tire, tmp_path, capsys):
    inputs, not_utf8, long_name = awkward_inputs(next((tiny_tire / "tire" / "test" / "good").glob("*.png")), tmp_path)
    found = ort_script.collect_images([str(inputs)])
    assert found == image_inputs.collect_images([str(inputs)]) == sorted([str(not_utf8), str(long_name)])
    assert ort_script.output_stems(found) == image_inputs.output_stems(found)

    out = tmp_path / "out"
    assert ort_script.main([str(exported), str(inputs), "-o", str(out), "--threshold", "0.5"]) == 0
    with open(out / "predictions.csv", newline="", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image"] for row in rows] == found
    for row in rows:
        for png in (row["heatmap"], row["overlay"]):
            assert cv2.imdecode(np.fromfile(png, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)

    blocked = tmp_path / "blocked"
    (blocked / "predictions.csv").mkdir(parents=True)
    assert ort_script.main([str(exported), str(inputs), "-o", str(blocked), "--threshold", "0.5"]) == 2
    line = one_error_line(capsys)
    assert "cannot write" in line and "predictions.csv" in line and "choose another --output" in line
    assert not (blocked / "predictions.csv.tmp").exists()


def test_output_stems_are_unique_for_one_name_with_two_extensions(tmp_path):
    paths = [str(tmp_path / "x.png"), str(tmp_path / "x.jpg"), str(tmp_path / "y.png")]
    for stems in (image_inputs.output_stems(paths), ort_script.output_stems(paths)):
        assert len(set(stems)) == 3 and stems[0] == "x" and stems[2] == "y"


def test_pth2onnx_refuses_two_sources_and_a_results_path_without_a_class(tmp_path, capsys):
    assert pth2onnx.main(["--class_dir", str(tmp_path), "--results_path", str(tmp_path)]) == 2
    assert "give either --class_dir or --results_path with -d, not both" in capsys.readouterr().err
    assert pth2onnx.main(["--results_path", str(tmp_path)]) == 2
    assert "--results_path needs the class: add -d CLASS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pth2onnx.main(["--checkpoint", "x.pth", "--imagesize", "0"])
    assert "0 is below 1" in capsys.readouterr().err


def test_ort_refuses_a_batch_size_of_zero(tmp_path, capsys):
    assert ort_script.main([str(tmp_path / "model.onnx"), str(tmp_path), "--batch_size", "0"]) == 2
    assert "--batch_size must be at least 1, not 0" in capsys.readouterr().err


def test_pth2onnx_embeds_the_class_threshold_and_ort_applies_it_at_or_above(trained_tire, tmp_path, tiny_tire):
    import onnx

    class_dir = tmp_path / "mvtec_tire"
    shutil.copytree(trained_tire / "models" / "backbone_0" / "mvtec_tire", class_dir, ignore=shutil.ignore_patterns("tb"))
    best = next(class_dir.glob("ckpt_best_*.pth")).name
    (class_dir / "threshold.json").write_text(json.dumps({"threshold": 0.42, "checkpoint": best}))
    assert pth2onnx.main(["--class_dir", str(class_dir), "--no_check"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(class_dir / "glass.onnx")).metadata_props}
    assert meta["threshold"] == "0.42"
    image = str(next((tiny_tire / "tire" / "test" / "good").glob("*.png")))
    [row] = ort_script.predict(str(class_dir / "glass.onnx"), [image], str(tmp_path / "a"), write_images=False)
    [row] = ort_script.predict(str(class_dir / "glass.onnx"), [image], str(tmp_path / "b"),
                               threshold=float(row["score"]), write_images=False)
    assert row["anomalous"] == "1"  # a score at the threshold is anomalous, as in predict


def test_fused_head_exports_a_smaller_graph_that_scores_alike(exported, class_dir, model, test_images, tmp_path):
    """pth2onnx --fuse_head: the graph of net --fuse_head, without the patch embedding's gathers and poolings."""
    path = tmp_path / "fused.onnx"
    assert pth2onnx.main(["--class_dir", str(class_dir), "--fuse_head", "-o", str(path)]) == 0
    fused, plain = onnx.load(str(path)), onnx.load(str(exported))
    assert {entry.key: entry.value for entry in fused.metadata_props}["head"] == "fused (--fuse_head)"
    assert {entry.key: entry.value for entry in plain.metadata_props}["head"] == "step by step"
    assert len(fused.graph.node) < len(plain.graph.node)
    images, _ = test_images
    scores, maps = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": images.numpy()})
    model.fuse_head = True
    try:
        fused_scores, fused_maps = model._predict(images)
    finally:
        model.fuse_head = False
    exact_scores, exact_maps = model._predict(images)
    for ref_scores, ref_maps in ((fused_scores, fused_maps), (exact_scores, exact_maps)):
        assert np.abs(scores - np.asarray(ref_scores)).max() < TOLERANCE
        assert np.abs(maps - np.stack(ref_maps)).max() < TOLERANCE
    assert maps.std() > 0


def test_pth2onnx_refuses_an_output_not_ending_in_onnx_before_writing(class_dir, tmp_path, capsys):
    """A name without .onnx was written once and then refused as "not an ONNX model" on the same command again."""
    target = tmp_path / "model"
    assert pth2onnx.main(["--class_dir", str(class_dir), "-o", str(target), "--no_check"]) == 2
    line = one_error_line(capsys)
    assert f"-o {target} does not end in .onnx: give a path such as {target}.onnx" in line
    assert list(tmp_path.iterdir()) == []


def test_ort_with_the_arguments_swapped_says_the_model_is_a_folder(exported, tiny_tire, capsys):
    images = tiny_tire / "tire" / "test" / "good"
    assert ort_script.main([str(images), str(exported)]) == 2
    line = one_error_line(capsys)
    assert f"model {images} is a folder, not an ONNX file: give the .onnx file first" in line
    assert "does not exist" not in line


def test_ort_logs_its_progress_without_a_terminal(exported, tiny_tire, tmp_path, monkeypatch, caplog, capsys):
    """Scoring many images takes minutes: without a terminal (here), a log line now and then; stdout unchanged."""
    monkeypatch.setattr(ort_script, "PROGRESS_SECONDS", 0.0)  # a line after every image but the last
    images = sorted((tiny_tire / "tire" / "test" / "good").glob("*.png"))[:3]
    with caplog.at_level("INFO"):
        assert ort_script.main([str(exported), *map(str, images), "-o", str(tmp_path / "out"), "--batch_size", "2",
                                "--no_images"]) == 0
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Scored ")]
    assert progress == ["Scored 1 of 3 images", "Scored 2 of 3 images"]
    out = capsys.readouterr().out
    assert out.startswith("Scored 3 image(s) (no threshold in the model") and out.count("\n") == 1


def test_ort_progress_on_a_terminal_without_tqdm_falls_back_to_log_lines(monkeypatch, caplog):
    """ort.py is deployed without this project's requirements: no tqdm, no bar, but the same log lines."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    with caplog.at_level("INFO"):
        assert list(ort_script.with_progress(iter("abc"), 3, every=0)) == ["a", "b", "c"]
    assert [r.getMessage() for r in caplog.records] == ["Scored 1 of 3 images", "Scored 2 of 3 images"]


def interrupt_once_working(command, log, started, timeout=120):
    """Run ``command`` with its stderr in the file ``log``; send it SIGINT (Ctrl-C) once ``started(stderr so far)``.
    Returns (exit code, stderr)."""
    import signal
    import time

    with open(log, "w") as err:
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + timeout
        while not started(log.read_text()):
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        child.wait(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, log.read_text()


def test_ctrl_c_in_ort_is_one_line_and_leaves_no_table(exported, tiny_tire, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    sources = sorted((tiny_tire / "tire" / "test").rglob("*.png"))
    for i in range(3000):  # minutes of scoring one by one: interrupted long before the end
        (inputs / f"{i:04d}.png").hardlink_to(sources[i % len(sources)])
    out = tmp_path / "out"
    code, err = interrupt_once_working(
        [sys.executable, "onnx/ort.py", str(exported), str(inputs), "-o", str(out), "--batch_size", "1"],
        tmp_path / "stderr.txt", lambda err: out.is_dir() and any(n.endswith("_overlay.png") for n in os.listdir(out)))
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"Interrupted (Ctrl-C): no predictions.csv written (the heatmaps and "
                                            f"overlays written so far stay in {out}); rerun the same command to score "
                                            "every image again.")
    assert not (out / "predictions.csv").exists() and not (out / "predictions.csv.tmp").exists()


def test_ctrl_c_in_pth2onnx_is_one_line_and_writes_nothing(class_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, err = interrupt_once_working(
        [sys.executable, "onnx/pth2onnx.py", "--class_dir", str(class_dir), "-o", str(out / "glass.onnx")],
        tmp_path / "stderr.txt", lambda err: " Exporting " in err)
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("Interrupted (Ctrl-C): no ONNX file written (an earlier export is left as "
                                            "it was); rerun the same command to export.")
    assert list(out.iterdir()) == []  # no temporary file left either

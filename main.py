"""GLASS command line: ``python main.py [OPTIONS] net [OPTIONS] dataset [OPTIONS] NAME DATA_PATH AUG_PATH``.

A chained Click group: ``net`` returns a factory of GLASS models, ``dataset`` a factory of data
loaders, and the result callback trains and/or tests every class and writes the results table.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from typing import Callable, Dict, List

import click
import numpy as np
import torch

import backbones
import glass
import utils
from datasets.base import raise_layout_problems
from utils import GlassError

LOGGER = logging.getLogger("glass")
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED_EXCEL_DIR = os.path.join(REPO_ROOT, "datasets", "excel")
METRIC_NAMES = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro", "best_epoch"]

# Dataset name -> (module, class). mpdd, wfdd, mad (MAD-man, MAD-sys) and custom folders share the MVTec AD
# layout; mvtec3d, loco and btad are small adapters of it; each module lists its classes in CLASSNAMES.
_DATASETS = {
    "mvtec": ("datasets.mvtec", "MVTecDataset"),
    "mpdd": ("datasets.mvtec", "MVTecDataset"),
    "wfdd": ("datasets.mvtec", "MVTecDataset"),
    "mad": ("datasets.mvtec", "MVTecDataset"),
    "custom": ("datasets.mvtec", "MVTecDataset"),
    "visa": ("datasets.visa", "VisADataset"),
    "mvtec3d": ("datasets.mvtec3d", "MVTec3DDataset"),
    "loco": ("datasets.loco", "LOCODataset"),
    "btad": ("datasets.btad", "BTADDataset"),
}


def default_num_workers() -> int:
    """The reference's 16 workers, but never more than this machine's cores."""
    return min(16, os.cpu_count() or 1)


@click.group(chain=True)
@click.option("--results_path", type=str, default="results", show_default=True, help="Where every output is written.")
@click.option("--gpu", type=int, default=[0], multiple=True, show_default=True,
              help="CUDA device id (the first one is used); falls back to MPS, then CPU. -1 forces the CPU.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log_group", type=str, default="group", help="Accepted for compatibility; unused.")
@click.option("--log_project", type=str, default="project", help="Accepted for compatibility; unused.")
@click.option("--run_name", type=str, default="test", help="Accepted for compatibility; unused.")
@click.option("--test", type=click.Choice(["ckpt", "test"]), default="ckpt", show_default=True,
              help="ckpt: train, then test the best checkpoint; test: only test the saved best checkpoint.")
def main(**kwargs):
    """Train and test GLASS anomaly detectors. Chain the `net` and `dataset` subcommands."""


@main.command("net")
@click.option("--dsc_margin", type=float, default=0.5, show_default=True, help="Score margin for the p_true/p_fake statistics.")
@click.option("--train_backbone", is_flag=True, help="Fine-tune the backbone too (AdamW, lr).")
@click.option("--backbone_names", "-b", type=str, multiple=True, default=[], help="Backbone name(s); NAME.seed-N fixes a seed per backbone.")
@click.option("--layers_to_extract_from", "-le", type=str, multiple=True, default=[], help="Backbone layer(s) to take features from, e.g. -le layer2 -le layer3.")
@click.option("--pretrain_embed_dimension", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--target_embed_dimension", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--patchsize", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--meta_epochs", type=click.IntRange(min=1), default=640, show_default=True)
@click.option("--eval_epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--dsc_layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--dsc_hidden", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--pre_proj", type=click.IntRange(min=0), default=1, show_default=True, help="Number of Linear layers in the feature adaptor (0: none).")
@click.option("--mining", type=int, default=1, show_default=True, help="1: gradient ascent for GAS; 0: Gaussian noise only.")
@click.option("--noise", type=float, default=0.015, show_default=True, help="Std of the Gaussian noise that starts GAS.")
@click.option("--radius", type=float, default=0.75, show_default=True, help="Quantile that defines the radii r_t, r_g, r_f.")
@click.option("--p", type=float, default=0.5, show_default=True, help="Hard-sample mining quantile of the LAS loss.")
@click.option("--lr", type=float, default=0.0001, show_default=True)
@click.option("--svd", type=int, default=0, show_default=True, help="0: manifold, 1: hypersphere (normally set by --distribution).")
@click.option("--step", type=click.IntRange(min=0), default=20, show_default=True, help="Gradient-ascent steps of GAS.")
@click.option("--limit", type=click.IntRange(min=0), default=392, show_default=True, help="Training samples per epoch (stops after more than this).")
@click.option("--cache", type=click.Choice(["auto", "ram", "disk", "off"]), default="auto", show_default=True,
              help="Frozen-backbone feature cache of the training and test images (same results as off): ram, disk "
                   "(float32 memmap under --results_path, deleted after training), auto (ram if it needs at most half "
                   "the available memory, else disk, else off) or off. Not used with --train_backbone; train-time "
                   "augmentation leaves only the test images cached.")
@click.option("--cache_dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="float16 halves the cache but rounds the cached features (changes the results slightly).")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True,
              help="CUDA autocast of the backbone and discriminator forwards (changes the results slightly; "
                   "fp16 without loss scaling: prefer bf16). Ignored with a warning elsewhere.")
@click.option("--compile", "compile_discriminator", is_flag=True,
              help="torch.compile the discriminator (CUDA; changes the results slightly). Ignored with a warning elsewhere.")
@click.option("--channels_last", is_flag=True, help="Backbone in channels-last memory format (changes the results slightly).")
def net(backbone_names, layers_to_extract_from, compile_discriminator, **options):
    """The model: backbone(s), feature layers and GLASS hyperparameters."""
    options["compile"] = compile_discriminator
    backbone_names = list(backbone_names)
    layers = list(layers_to_extract_from)

    def get_glass(input_shape, device) -> List[glass.GLASS]:
        if not backbone_names:
            raise GlassError("no backbone given: add -b NAME to `net` (e.g. -b wideresnet50 or -b efficientnet_lite0)")
        if not layers:
            raise GlassError("no feature layers given: add -le LAYER to `net` (e.g. -le layer2 -le layer3)")
        models = []
        for full_name in backbone_names:
            name, backbone_seed = backbones.parse_backbone_name(full_name)
            backbone = backbones.load(name)
            backbone.name, backbone.seed = name, backbone_seed
            model = glass.GLASS(device)
            model.load(backbone=backbone, layers_to_extract_from=layers, device=device, input_shape=input_shape, **options)
            model.run_config = {
                "backbone": name,
                "backbone_seed": backbone_seed,
                "layers_to_extract_from": layers,
                "input_shape": list(input_shape),
                "net": dict(options),
            }
            models.append(model.to(device))
        return models

    get_glass.options = {"backbone_names": backbone_names, "layers_to_extract_from": layers, **options}  # for run.json
    return "get_glass", get_glass


@main.command("dataset")
@click.argument("name", type=str)
@click.argument("data_path", type=click.Path(exists=True, file_okay=False))
@click.argument("aug_path", type=click.Path(exists=True, file_okay=False))
@click.option("--subdatasets", "-d", multiple=True, type=str, required=True, help="Class name(s) to run, e.g. -d bottle -d cable.")
@click.option("--batch_size", default=8, type=click.IntRange(min=1), show_default=True)
@click.option("--num_workers", default=default_num_workers(), type=click.IntRange(min=0), show_default=True,
              help="DataLoader workers (reference: 16; here at most the number of cores).")
@click.option("--resize", default=288, type=click.IntRange(min=1), show_default=True)
@click.option("--imagesize", default=288, type=click.IntRange(min=1), show_default=True)
@click.option("--rotate_degrees", default=0, type=int)
@click.option("--translate", default=0, type=float)
@click.option("--scale", default=0.0, type=float)
@click.option("--brightness", default=0.0, type=float)
@click.option("--contrast", default=0.0, type=float)
@click.option("--saturation", default=0.0, type=float)
@click.option("--gray", default=0.0, type=float)
@click.option("--hflip", default=0.0, type=float)
@click.option("--vflip", default=0.0, type=float)
@click.option("--distribution", default=0, type=click.IntRange(0, 4), show_default=True,
              help="0: from the xlsx; 1: judge only; 2: manifold; 3: hypersphere; 4: opposite of the xlsx.")
@click.option("--mean", default=0.5, type=float, show_default=True, help="Mean of the LAS blending factor beta.")
@click.option("--std", default=0.1, type=float, show_default=True, help="Std of the LAS blending factor beta.")
@click.option("--fg", default=1, type=click.IntRange(0, 2), show_default=True,
              help="Foreground masks for LAS: 0 none, 1 from <data>/fg_mask/<class>/, 2 as the xlsx says.")
@click.option("--rand_aug", default=1, type=int, show_default=True, help="Random augmentation of the anomaly textures.")
@click.option("--downsampling", default=8, type=click.IntRange(min=1), show_default=True, help="Image size / feature grid size.")
@click.option("--augment", is_flag=True, help="Accepted for compatibility; unused.")
def dataset(name, data_path, aug_path, subdatasets, batch_size, num_workers, **options):
    """The data: NAME (mvtec, visa, mpdd, wfdd, mad, mvtec3d, loco, btad, custom), DATA_PATH, AUG_PATH (DTD images) and loader options."""
    if name not in _DATASETS:
        raise click.BadParameter(f"unknown dataset '{name}': choose one of {', '.join(sorted(_DATASETS))}", param_hint="NAME")
    module_name, class_name = _DATASETS[name]
    if options["imagesize"] % options["downsampling"]:
        raise click.BadParameter(
            f"--imagesize {options['imagesize']} is not a multiple of --downsampling {options['downsampling']}",
            param_hint="--imagesize",
        )

    def get_dataloaders(seed: int, test: str, excel_dir: str) -> List[Dict[str, torch.utils.data.DataLoader]]:
        module = __import__(module_name, fromlist=[class_name])
        dataset_class = getattr(module, class_name)
        loaders, checked = [], []
        for classname in subdatasets:
            # Layout problems of every split of every class are reported together, before training starts.
            common = dict(classname=classname, resize=options["resize"], imagesize=options["imagesize"], seed=seed,
                          check_layout=False)
            test_set = dataset_class(data_path, aug_path, dataset_name=name, split=module.DatasetSplit.TEST, **common)
            test_loader = make_loader(test_set, batch_size, num_workers, shuffle=False)
            test_loader.name = f"{name}_{classname}"
            test_loader.dataset_config = {
                "name": name, "data_path": os.path.abspath(data_path), "aug_path": os.path.abspath(aug_path),
                "classname": classname, "batch_size": batch_size, **options,
                "resize_used": test_set.resize, "imagesize_used": test_set.imgsize,
            }
            if test == "ckpt":
                train_set = dataset_class(
                    data_path, aug_path, dataset_name=name, split=module.DatasetSplit.TRAIN,
                    rotate_degrees=options["rotate_degrees"], translate=options["translate"],
                    brightness_factor=options["brightness"], contrast_factor=options["contrast"],
                    saturation_factor=options["saturation"], gray_p=options["gray"],
                    h_flip_p=options["hflip"], v_flip_p=options["vflip"], scale=options["scale"],
                    distribution=options["distribution"], mean=options["mean"], std=options["std"],
                    fg=options["fg"], rand_aug=options["rand_aug"], downsampling=options["downsampling"],
                    augment=options["augment"], batch_size=batch_size, excel_dir=excel_dir, **common,
                )
                checked += [test_set, train_set]
                train_loader = make_loader(train_set, batch_size, num_workers, shuffle=True)
                train_loader.name = test_loader.name
                LOGGER.info("Dataset %s: train=%d test=%d", classname, len(train_set), len(test_set))
            else:
                checked.append(test_set)
                train_loader = test_loader
                LOGGER.info("Dataset %s: train=0 test=%d", classname, len(test_set))
            loaders.append({"training": train_loader, "testing": test_loader})
        raise_layout_problems(checked)
        return loaders

    get_dataloaders.options = {  # for run.json
        "name": name, "data_path": os.path.abspath(data_path), "aug_path": os.path.abspath(aug_path),
        "subdatasets": list(subdatasets), "batch_size": batch_size, "num_workers": num_workers, **options,
    }
    return "get_dataloaders", get_dataloaders


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--subdataset", "-d", required=True, help="Trained class to use, e.g. -d bottle.")
@click.option("--dataset", "dataset_name", default="mvtec", show_default=True,
              help="Dataset name used at training; the model is <results_path>/models/backbone_<i>/<dataset>_<class>.")
@click.option("--backbone_index", default=0, type=click.IntRange(min=0), show_default=True, help="Which backbone_<i> folder.")
@click.option("--threshold", type=float, default=None,
              help="Score at or above which an image is anomalous. Default: <class folder>/threshold.json, chosen on the test set when missing.")
@click.option("--calibrate", is_flag=True, help="Choose the threshold on the test set again (F1-best) and rewrite threshold.json.")
@click.option("--output", type=str, default=None, help="Folder for predictions.csv and the PNGs [default: <results_path>/predict/<dataset>_<class>].")
@click.option("--data_path", type=str, default=None, help="Dataset root for calibration [default: the one recorded in config.json].")
@click.option("--batch_size", default=8, type=click.IntRange(min=1), show_default=True, help="Images per forward pass.")
def predict(inputs, subdataset, dataset_name, backbone_index, threshold, calibrate, output, data_path, batch_size):
    """Score new images with a trained class. INPUTS: image files, folders (recursive) or quoted glob patterns."""

    def run_predict(results_path: str, device: torch.device) -> None:
        class_dir = os.path.join(results_path, "models", f"backbone_{backbone_index}", f"{dataset_name}_{subdataset}")
        if not os.path.isdir(class_dir):
            raise GlassError(f"no trained class folder {class_dir}: check --results_path, -d and --dataset, or train the class first")
        paths = glass.collect_images(inputs)
        model, config = glass.load_trained(class_dir, device=device)

        def make_test_loader() -> torch.utils.data.DataLoader:
            recorded = config.get("dataset", {})
            root = data_path or recorded.get("data_path")
            name = recorded.get("name", dataset_name)
            if not root or not os.path.isdir(root):
                raise GlassError(f"the test set to choose a threshold on is not at {root}: pass --data_path or --threshold")
            module_name, class_name = _DATASETS[name]
            module = __import__(module_name, fromlist=[class_name])
            test_set = getattr(module, class_name)(
                root, recorded.get("aug_path", root), dataset_name=name, split=module.DatasetSplit.TEST,
                classname=recorded.get("classname", subdataset), resize=recorded.get("resize", config["input_shape"][-1]),
                imagesize=recorded.get("imagesize", config["input_shape"][-1]),
            )
            loader = make_loader(test_set, batch_size, 0, shuffle=False)
            loader.name = f"{name}_{test_set.classname}"
            return loader

        record = glass.choose_threshold(model, class_dir, threshold, calibrate, make_test_loader)
        out_dir = output or os.path.join(results_path, "predict", f"{dataset_name}_{subdataset}")
        rows = glass.predict_images(model, config, paths, out_dir, record["threshold"], batch_size)
        flagged = sum(row["anomalous"] == "1" for row in rows)
        click.echo(f"{dataset_name}_{subdataset}: {flagged} of {len(rows)} image(s) anomalous at threshold "
                   f"{record['threshold']:.6f} ({record['method'].split(';')[0]})")
        click.echo(f"Predictions: {os.path.join(out_dir, 'predictions.csv')}")

    return "predict", run_predict


def make_loader(data, batch_size: int, num_workers: int, shuffle: bool) -> torch.utils.data.DataLoader:
    """A DataLoader with the reference's settings (prefetch 2, pinned memory on CUDA).

    The anomaly synthesis (texture, Perlin mask, blending) runs in ``__getitem__``, so in the workers.
    Workers are not persistent: a persistent training loader's workers would carry their random
    generators from epoch to epoch, which a resumed run cannot restore (it would no longer end as an
    uninterrupted run), and every class's loaders are built up front, so persistent test workers would
    stay alive for the whole run; with the feature cache the test loader is read once per training anyway.
    """
    extra = {"prefetch_factor": 2} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), **extra,
    )


def ensure_writable(path: str) -> str:
    """Create the results folder, or explain why it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise GlassError(f"cannot write to --results_path {path} ({exc.strerror}): choose a writable folder") from None
    return path


@main.result_callback()
def run(methods, results_path, gpu, seed, log_group, log_project, run_name, test):
    """Train and/or test every class, printing metrics and rewriting results.csv after each one.

    A class whose training was interrupted resumes from its ``ckpt.pth``; a finished one is only
    tested. The run is recorded in ``<results>/run_<timestamp>.json`` and ``<results>/run.json``.
    """
    methods = dict(methods)
    predict_images = methods.pop("predict", None)
    if predict_images is not None and not methods:  # `predict` alone: score images with a trained class
        predict_images(results_path, utils.select_device(gpu))
        return
    missing = [cmd for cmd, key in (("net", "get_glass"), ("dataset", "get_dataloaders")) if key not in methods]
    if missing:
        raise GlassError(f"missing subcommand(s): {', '.join(missing)}; usage: python main.py [OPTIONS] net [OPTIONS] dataset [OPTIONS] NAME DATA_PATH AUG_PATH")
    results_path = ensure_writable(results_path)
    excel_dir = os.path.join(results_path, "datasets", "excel")
    list_of_dataloaders = methods["get_dataloaders"](seed, test, excel_dir)
    device = utils.select_device(gpu)
    group_options = dict(results_path=results_path, gpu=list(gpu), seed=seed, log_group=log_group,
                         log_project=log_project, run_name=run_name, test=test)
    record = RunRecord(results_path, group_options, methods, device)
    try:
        _run_classes(methods, list_of_dataloaders, results_path, excel_dir, device, seed, test, record)
    except BaseException as exc:
        record.finish("interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {utils.error_message(exc)}")
        raise
    record.finish("finished")
    if predict_images is not None:  # chained after training/testing: score the images with the new checkpoint
        predict_images(results_path, device)


def _run_classes(methods, list_of_dataloaders, results_path, excel_dir, device, seed, test, record) -> None:
    """The per-class loop of :func:`run`."""
    rows, row_names = [], []
    judged: Dict[str, int] = {}
    stopped: List[str] = []  # classes whose training stopped on a non-finite loss
    dataset_name = None
    for index, dataloaders in enumerate(list_of_dataloaders):
        utils.fix_seeds(seed, device)
        dataset_name = dataloaders["training"].name
        imagesize = dataloaders["training"].dataset.imagesize
        models = methods["get_glass"](imagesize, device)
        LOGGER.info("Selecting dataset [%s] (%d/%d) %s", dataset_name, index + 1, len(list_of_dataloaders),
                    datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
        models_dir = os.path.join(results_path, "models")
        for i, model in enumerate(models):
            if model.backbone.seed is not None:
                utils.fix_seeds(model.backbone.seed, device)
            model.set_model_dir(os.path.join(models_dir, f"backbone_{i}"), dataset_name, results_path=results_path)
            model.excel_dirs = [excel_dir, SHIPPED_EXCEL_DIR]
            try:
                # Refuses a folder trained with other model options; records config.json for a new run.
                model.check_config({**model.run_config, "dataset": dataloaders["testing"].dataset_config, "seed": seed},
                                   training=test == "ckpt")
                if test == "ckpt":
                    try:
                        outcome = model.trainer(dataloaders["training"], dataloaders["testing"], dataset_name)
                    except glass.NonFiniteLossError as exc:
                        LOGGER.error("%s", exc)
                        stopped.append(str(exc))
                        continue
                    if model.judged_distribution is not None:
                        judged[dataset_name] = model.judged_distribution
                    if isinstance(outcome, int):  # --distribution 1: judged only
                        continue
                    if outcome is None:
                        click.echo(f"{dataset_name}: already trained, testing its best checkpoint "
                                   f"(to train it again, delete {model.ckpt_dir} or use another --results_path)")
                result = list(model.tester(dataloaders["testing"], dataset_name))
            finally:
                model.close()
            rows.append(result)
            row_names.append(dataset_name)
            click.echo(dataset_name + ": " + " ".join(
                f"{key}:{utils.format_metric(value)}" if key != "best_epoch" else f"{key}:{int(value)}"
                for key, value in zip(METRIC_NAMES, result)
            ))
            utils.compute_and_store_final_results(results_path, rows, METRIC_NAMES, row_names=row_names)
            record.add_result(dataset_name if len(models) == 1 else f"{dataset_name}/backbone_{i}", result)

    if judged:
        path = utils.record_distributions(excel_dir, dataset_name.split("_")[0], judged)
        LOGGER.info("Distribution judgements written to %s", path)
    if rows:
        click.echo(results_table(rows, row_names))
        click.echo(f"Results: {os.path.join(results_path, 'results.csv')}")
    if stopped:
        raise GlassError(stopped[0] if len(stopped) == 1 else f"training stopped for {len(stopped)} classes: " + " | ".join(stopped))


class RunRecord:
    """``<results>/run_<timestamp>.json`` (and a copy as ``run.json``): how a run was made and how it ended.

    Holds the command line, every option, the device, Python, platform and package versions, the git
    commit of this code (``unknown`` outside a git checkout), start and end times, status and results.
    """

    def __init__(self, results_path: str, group_options: dict, methods: dict, device: torch.device) -> None:
        import platform

        started = datetime.now()
        stamp = started.strftime("%Y%m%d-%H%M%S")
        self.path = os.path.join(results_path, f"run_{stamp}.json")
        suffix = 1
        while os.path.exists(self.path):
            suffix += 1
            self.path = os.path.join(results_path, f"run_{stamp}-{suffix}.json")
        self.latest = os.path.join(results_path, "run.json")
        ctx = click.get_current_context(silent=True)
        argv = (ctx.obj or {}).get("argv") if ctx is not None and isinstance(ctx.obj, dict) else None
        self.data = {
            "command_line": ["main.py", *(argv if argv is not None else sys.argv[1:])],
            "cwd": os.getcwd(),
            "options": {
                "main": group_options,
                "net": getattr(methods.get("get_glass"), "options", None),
                "dataset": getattr(methods.get("get_dataloaders"), "options", None),
            },
            "device": str(device),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": utils.package_versions(),
            "cuda": torch.version.cuda,
            "git_commit": utils.git_commit(REPO_ROOT),
            "started": started.isoformat(timespec="seconds"),
            "finished": None,
            "status": "running",
            "results": {},
        }
        self.write()

    def add_result(self, name: str, result: List[float]) -> None:
        self.data["results"][name] = dict(zip(METRIC_NAMES, [None if not np.isfinite(v) else float(v) for v in result]))
        self.write()

    def finish(self, status: str) -> None:
        self.data.update(status=status, finished=datetime.now().isoformat(timespec="seconds"))
        try:
            self.write()
        except OSError as exc:  # never hide the run's own outcome behind a failed record
            LOGGER.warning("Could not update %s (%s)", self.path, exc)

    def write(self) -> None:
        for path in (self.path, self.latest):
            utils.atomic_write(path, lambda tmp: utils.write_json(tmp, self.data))


def results_table(rows: List[List[float]], row_names: List[str]) -> str:
    """A plain-text table of the results (percent) with a mean row."""
    header = ["class"] + METRIC_NAMES
    lines = [header]
    for name, row in zip(row_names, rows):
        lines.append([name] + [utils.format_metric(v) for v in row[:-1]] + [str(int(row[-1]))])
    if len(rows) > 1:
        means = []
        for column in np.array(rows, dtype=float)[:, :-1].T:
            finite = column[np.isfinite(column)]
            means.append(utils.format_metric(float(finite.mean()) if len(finite) else float("nan")))
        lines.append(["Mean"] + means + [""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines)


def cli(argv: List[str] | None = None) -> int:
    """Entry point: user mistakes end with one line on stderr and exit code 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    LOGGER.info("Command line arguments: %s", " ".join(sys.argv if argv is None else ["main.py", *argv]))
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        main.main(args=args, prog_name="main.py", standalone_mode=False, obj={"argv": args})
    except GlassError as exc:
        click.echo(f"Error: {utils.error_message(exc)}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.UsageError as exc:  # one line for the mistake, one for where to look
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())) and exc.ctx is not None:
            click.echo(exc.ctx.get_help(), err=True)  # no arguments at all: the help, as click shows it
            return 2
        click.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
        if exc.ctx is not None:
            click.echo(f"Try '{exc.ctx.command_path} --help' for help.", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

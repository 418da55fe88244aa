"""GLASS command line: ``python main.py [OPTIONS] net [OPTIONS] dataset [OPTIONS] NAME DATA_PATH AUG_PATH``,
optionally followed by ``predict [OPTIONS] IMAGES...``, or ``python main.py [OPTIONS] predict ...`` alone.

A chained Click group: ``net`` returns a factory of GLASS models, ``dataset`` a factory of data
loaders, ``predict`` a function that scores images with a trained class, and the result callback trains
and/or tests every class, writes the results table and then runs ``predict``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import click

import utils
from datasets import LOADERS, loader_class
from utils import DeferredModule, GlassError

# Imported on first use, so that --help and option mistakes answer without importing torch (seconds).
backbones = DeferredModule("backbones")
glass = DeferredModule("glass")
datasets_base = DeferredModule("datasets.base")
image_inputs = DeferredModule("datasets.inputs")
if TYPE_CHECKING:
    import torch

LOGGER = logging.getLogger("glass")
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


def default_num_workers() -> int:
    """The reference's 16 workers, but never more than the cores this process can use (``utils.usable_cores``:
    CPU affinity and a container's CPU quota)."""
    return min(16, utils.usable_cores())


class FiniteRange(click.FloatRange):
    """A float range that refuses nan and inf, which every range check lets through."""

    name = "float"  # "'abc' is not a valid float." rather than "... a valid float range."

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number

    def _describe_range(self) -> str:  # click writes "x<=None" for a range without bounds
        if self.min is None and self.max is None:
            return "finite"
        return super()._describe_range()


def odd_patchsize(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """--patchsize must be odd (utils.check_odd_patchsize)."""
    try:
        return utils.check_odd_patchsize(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def known_dataset(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``dataset NAME``: one of :data:`LOADERS`, checked before the paths after it (so that a left-out NAME is
    named, not the AUG_PATH that the paths then lack)."""
    if value in LOADERS:
        return value
    choices = ", ".join(sorted(LOADERS))
    if os.path.exists(value):
        raise click.BadParameter(f"'{value}' is a path, not a dataset name: give NAME first, then DATA_PATH AUG_PATH "
                                 f"(e.g. `dataset -d bottle mvtec DATA_PATH AUG_PATH`); NAME is one of {choices}")
    raise click.BadParameter(f"unknown dataset '{value}': choose one of {choices}")


def gpu_ids(ctx: click.Context, param: click.Parameter, value: Tuple[int, ...]) -> Tuple[int, ...]:
    """``--gpu``: device ids 0 and up, or -1 alone (the CPU)."""
    if any(gpu < -1 for gpu in value):
        raise click.BadParameter(f"{min(value)} is not a device: give CUDA ids 0 and up, or -1 for the CPU")
    if -1 in value and any(gpu >= 0 for gpu in value):
        raise click.BadParameter("-1 (the CPU) cannot be combined with GPU ids: give --gpu -1 alone, or GPU ids only")
    return value


class Subcommands(click.Group):
    """The chained group of ``net``, ``dataset`` and ``predict``, each at most once: a second one would replace
    the first without a word (or fail for options given to the first)."""

    def resolve_command(self, ctx: click.Context, args: List[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            seen = ctx.meta.setdefault("glass.subcommands", set())
            if command.name in seen:
                raise click.UsageError(f"`{command.name}` is given twice: give all its options to one `{command.name}`",
                                       ctx)
            seen.add(command.name)
        return name, command, rest


@click.group(chain=True, cls=Subcommands)
@click.option("--results_path", type=str, default="results", show_default=True, help="Where every output is written.")
@click.option("--gpu", type=int, default=[0], multiple=True, show_default=True, callback=gpu_ids,
              help="CUDA device id; falls back to MPS, then CPU. -1 forces the CPU. Several ids (--gpu 0 --gpu 1) "
                   "train different classes on different GPUs in parallel processes, one class per GPU at a time "
                   "(without CUDA: one class at a time on the CPU).")
@click.option("--seed", type=click.IntRange(0, utils.MAX_SEED), default=0, show_default=True)
@click.option("--log_group", type=str, show_default=True, default="group", help="Accepted for compatibility; unused.")
@click.option("--log_project", type=str, show_default=True, default="project", help="Accepted for compatibility; unused.")
@click.option("--run_name", type=str, show_default=True, default="test", help="Accepted for compatibility; unused.")
@click.option("--test", type=click.Choice(["ckpt", "test"]), default="ckpt", show_default=True,
              help="ckpt: train, then test the best checkpoint; test: only test the saved best checkpoint.")
# Set by a parallel run (several --gpu ids) on the worker processes it starts: run one class on one device and
# hand its results back in a JSON file instead of writing results.csv and the run record.
@click.option("--worker_class", type=str, default=None, hidden=True)
@click.option("--worker_gpu", type=int, default=None, hidden=True)
@click.option("--worker_output", type=str, default=None, hidden=True)
def main(**kwargs):
    """Train and test GLASS anomaly detectors. Chain the `net` and `dataset` subcommands."""


@main.command("net")
@click.option("--dsc_margin", type=FiniteRange(), default=0.5, show_default=True, help="Score margin for the p_true/p_fake statistics.")
@click.option("--train_backbone", is_flag=True, help="Fine-tune the backbone too (AdamW, lr).")
@click.option("--backbone_names", "-b", type=str, multiple=True, default=[], help="Backbone name(s), required; NAME.seed-N fixes a seed per backbone.")
@click.option("--layers_to_extract_from", "-le", type=str, multiple=True, default=[], help="Backbone layer(s) to take features from, required, e.g. -le layer2 -le layer3.")
@click.option("--pretrain_embed_dimension", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--target_embed_dimension", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--patchsize", type=click.IntRange(min=1), default=3, show_default=True, callback=odd_patchsize,
              help="Side of the neighbourhood aggregated around each location (odd).")
@click.option("--meta_epochs", type=click.IntRange(min=1), default=640, show_default=True)
@click.option("--eval_epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--dsc_layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--dsc_hidden", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--pre_proj", type=click.IntRange(min=0), default=1, show_default=True, help="Number of Linear layers in the feature adaptor (0: none).")
@click.option("--mining", type=click.IntRange(0, 1), default=1, show_default=True, help="1: gradient ascent for GAS; 0: Gaussian noise only.")
@click.option("--noise", type=FiniteRange(min=0), default=0.015, show_default=True, help="Std of the Gaussian noise that starts GAS.")
@click.option("--radius", type=FiniteRange(0, 1), default=0.75, show_default=True, help="Quantile that defines the radii r_t, r_g, r_f.")
@click.option("--p", type=FiniteRange(0, 1), default=0.5, show_default=True, help="Hard-sample mining quantile of the LAS loss.")
@click.option("--lr", type=FiniteRange(min=0, min_open=True), default=0.0001, show_default=True,
              help="Learning rate (projection; twice this for the discriminator).")
@click.option("--svd", type=click.IntRange(0, 1), default=0, show_default=True, help="Kept for the reference's scripts and ignored: the hypothesis (manifold or hypersphere) comes from dataset --distribution (2 manifold, 3 hypersphere, 0 the table or a judgement).")
@click.option("--step", type=click.IntRange(min=0), default=20, show_default=True, help="Gradient-ascent steps of GAS.")
@click.option("--limit", type=click.IntRange(min=0), default=392, show_default=True, help="Training samples per epoch (stops after more than this).")
@click.option("--cache", type=click.Choice(utils.CACHE_MODES), default="auto", show_default=True,
              help="Frozen-backbone feature cache of the training and test images (same results as off on the CPU): ram, disk "
                   "(memmap of --cache_dtype values under --results_path, deleted after training), auto (ram if it needs at most half "
                   "the available memory, else disk, else off) or off. Not used with --train_backbone; train-time "
                   "augmentation leaves only the test images cached.")
@click.option("--cache_dtype", type=click.Choice(utils.CACHE_DTYPES), default="float32", show_default=True,
              help="float16 halves the cache but rounds the cached features (changes the results slightly).")
@click.option("--amp", type=click.Choice(utils.AMP_MODES), default="off", show_default=True,
              help="CUDA autocast of the backbone and discriminator forwards (changes the results slightly; "
                   "fp16 without loss scaling: prefer bf16). Ignored with a warning elsewhere.")
@click.option("--compile", "compile_discriminator", is_flag=True,
              help="torch.compile the discriminator (CUDA; changes the results slightly). Ignored with a warning elsewhere.")
@click.option("--channels_last", is_flag=True, help="Backbone in channels-last memory format (changes the results slightly).")
@click.option("--onednn", is_flag=True,
              help="CPU: the projection's and discriminator's matrix products (GAS included) through oneDNN, which "
                   "uses AVX-512 where MKL does not (AMD CPUs: about 2x faster products; changes the results "
                   "slightly). Ignored with a warning elsewhere.")
@click.option("--fuse_head", is_flag=True,
              help="Evaluate and test through a fused head that folds the patch embedding, projection and the "
                   "discriminator's first Linear layer and BatchNorm into a grouped convolution and a matrix product per "
                   "layer, with the anomaly maps' upsampling and smoothing as matrix products (scoring several times faster; "
                   "changes the scores in the last bits). Training is unchanged.")
def net(backbone_names, layers_to_extract_from, compile_discriminator, **options):
    """The model: backbone(s), feature layers and GLASS hyperparameters."""
    options["compile"] = compile_discriminator
    backbone_names = list(backbone_names)
    layers = list(layers_to_extract_from)
    if options["eval_epochs"] > options["meta_epochs"]:
        raise click.BadParameter(
            f"{options['eval_epochs']} > --meta_epochs {options['meta_epochs']}: no epoch would be evaluated, so no best "
            "checkpoint would be saved to test", param_hint="--eval_epochs")
    if options["svd"] != 0:
        LOGGER.warning("--svd %d is ignored (as in the reference): the hypothesis comes from `dataset --distribution` "
                       "(2: manifold, 3: hypersphere, 0: the distribution table)", options["svd"])

    if not backbone_names:  # checked here, before the data are: both are the reference's multiple options
        raise GlassError("no backbone given: add -b NAME to `net` (e.g. -b wideresnet50 or -b efficientnet_lite0)")
    repeated = sorted({name for name in backbone_names if backbone_names.count(name) > 1})
    if repeated:  # the reference trains the copy (same seed: the same model) again and counts it twice in the Mean row
        raise click.BadParameter(f"{', '.join(repeated)} given more than once: name each backbone once (the same one "
                                 "with another seed: NAME.seed-N)", param_hint="-b/--backbone_names")
    if not layers:
        name = backbones.parse_backbone_name(backbone_names[0])[0]
        example = backbones.DEFAULT_LAYERS.get(name, ["layer2", "layer3"])
        raise GlassError("no feature layers given: add -le LAYER to `net` (for "
                         f"{name}, e.g. {' '.join('-le ' + layer for layer in example)})")

    def get_glass(input_shape, device) -> List[glass.GLASS]:
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


@main.command("dataset", short_help="The data: NAME DATA_PATH AUG_PATH, classes (-d) and loader options.")
@click.argument("name", type=str, callback=known_dataset)
@click.argument("data_path", type=click.Path(exists=True, file_okay=False))
@click.argument("aug_path", type=click.Path(exists=True, file_okay=False))
@click.option("--subdatasets", "-d", multiple=True, type=str, required=True, help="Class name(s) to run, e.g. -d bottle -d cable.")
@click.option("--batch_size", default=8, type=click.IntRange(min=1), show_default=True)
@click.option("--num_workers", default=default_num_workers(), type=click.IntRange(min=0), show_default=True,
              help="DataLoader workers (the reference's default: 16; here min(16, the cores this process can use: CPU "
                   "affinity, container CPU quota)).")
@click.option("--resize", default=288, type=click.IntRange(min=1), show_default=True)
@click.option("--imagesize", default=288, type=click.IntRange(min=1), show_default=True)
@click.option("--rotate_degrees", default=0, type=click.IntRange(min=0), show_default=True,
              help="Train-time augmentation: random rotation within +-this many degrees.")
@click.option("--translate", default=0.0, type=FiniteRange(0, 1), show_default=True,
              help="Train-time augmentation: random shift, as a fraction of the image size.")
@click.option("--scale", default=0.0, type=FiniteRange(0, 1, max_open=True), show_default=True,
              help="Train-time augmentation: random zoom within 1 +- this.")
@click.option("--brightness", default=0.0, type=FiniteRange(min=0), show_default=True, help="Train-time augmentation: ColorJitter brightness.")
@click.option("--contrast", default=0.0, type=FiniteRange(min=0), show_default=True, help="Train-time augmentation: ColorJitter contrast.")
@click.option("--saturation", default=0.0, type=FiniteRange(min=0), show_default=True, help="Train-time augmentation: ColorJitter saturation.")
@click.option("--gray", default=0.0, type=FiniteRange(0, 1), show_default=True, help="Train-time augmentation: probability of greyscale.")
@click.option("--hflip", default=0.0, type=FiniteRange(0, 1), show_default=True, help="Train-time augmentation: probability of a horizontal flip.")
@click.option("--vflip", default=0.0, type=FiniteRange(0, 1), show_default=True, help="Train-time augmentation: probability of a vertical flip.")
@click.option("--distribution", default=0, type=click.IntRange(0, 4), show_default=True,
              help="0: from the xlsx; 1: judge only; 2: manifold; 3: hypersphere; 4: opposite of the xlsx.")
@click.option("--mean", default=0.5, type=FiniteRange(), show_default=True, help="Mean of the LAS blending factor beta.")
@click.option("--std", default=0.1, type=FiniteRange(min=0), show_default=True, help="Std of the LAS blending factor beta.")
@click.option("--fg", default=1, type=click.IntRange(0, 2), show_default=True,
              help="Foreground masks for LAS: 0 none, 1 from <data>/fg_mask/<class>/, 2 as the xlsx says.")
@click.option("--rand_aug", default=1, type=click.IntRange(0, 1), show_default=True, help="Random augmentation of the anomaly textures.")
@click.option("--downsampling", default=8, type=click.IntRange(min=1), show_default=True, help="Image size / feature grid size.")
@click.option("--augment", is_flag=True, help="Accepted for compatibility; unused.")
def dataset(name, data_path, aug_path, subdatasets, batch_size, num_workers, **options):
    """The data: NAME (mvtec, visa, mpdd, wfdd, mad, mvtec3d, loco, btad, custom), DATA_PATH, AUG_PATH (DTD images) and loader options."""
    subdatasets = tuple(classname.rstrip("/" + os.sep) for classname in subdatasets)  # "tire/" from tab completion
    odd = [classname for classname in subdatasets if classname in ("", ".", "..") or "/" in classname or os.sep in classname]
    if odd:
        raise click.BadParameter(f"'{odd[0]}' is not a class folder name: give the folder's name under DATA_PATH "
                                 "(e.g. -d bottle)", param_hint="-d/--subdatasets")
    undecodable = [classname for classname in subdatasets if not utils.is_utf8(classname)]
    if undecodable:
        raise click.BadParameter(f"'{undecodable[0]}' is not valid UTF-8, and TensorBoard writes only to such paths: "
                                 "rename the class folder", param_hint="-d/--subdatasets")
    repeated = sorted({classname for classname in subdatasets if subdatasets.count(classname) > 1})
    if repeated:
        raise click.BadParameter(f"{', '.join(repeated)} given more than once: name each class once",
                                 param_hint="-d/--subdatasets")
    cores = utils.usable_cores()
    if num_workers > cores:  # said once, instead of torch's warning at every loader
        LOGGER.warning("--num_workers %d is more than the %d core(s) this process can use: the workers share them with "
                       "training (torch suggests at most %d)", num_workers, cores, cores)
        warnings.filterwarnings("ignore", message="This DataLoader will create")
    if options["resize"] < options["imagesize"]:
        LOGGER.warning("--resize %d is smaller than --imagesize %d: the centre crop pads the images with a zero border "
                       "(as the reference does); give --resize >= --imagesize to crop inside the image",
                       options["resize"], options["imagesize"])
    if options["imagesize"] % options["downsampling"]:
        raise click.BadParameter(
            f"--imagesize {options['imagesize']} is not a multiple of --downsampling {options['downsampling']}",
            param_hint="--imagesize",
        )

    def get_dataloaders(test: str, excel_dir: str, classes: Sequence[str] | None = None
                        ) -> List[Dict[str, torch.utils.data.DataLoader]]:
        """Loaders of every class of ``-d`` (or only of ``classes``: a worker process runs one class)."""
        dataset_class = loader_class(name)
        train_split, test_split = datasets_base.DatasetSplit.TRAIN, datasets_base.DatasetSplit.TEST
        splits = []  # (test set, train set or None) of each class
        for classname in (subdatasets if classes is None else classes):
            common = dict(classname=classname, resize=options["resize"], imagesize=options["imagesize"],
                          check_layout=False)
            test_set = dataset_class(data_path, aug_path, dataset_name=name, split=test_split, **common)
            train_set = None
            if test == "ckpt":
                train_set = dataset_class(
                    data_path, aug_path, dataset_name=name, split=train_split,
                    rotate_degrees=options["rotate_degrees"], translate=options["translate"],
                    brightness_factor=options["brightness"], contrast_factor=options["contrast"],
                    saturation_factor=options["saturation"], gray_p=options["gray"],
                    h_flip_p=options["hflip"], v_flip_p=options["vflip"], scale=options["scale"],
                    distribution=options["distribution"], mean=options["mean"], std=options["std"],
                    fg=options["fg"], rand_aug=options["rand_aug"], downsampling=options["downsampling"],
                    excel_dir=excel_dir, **common,
                )
            splits.append((test_set, train_set))
        # Layout problems of every split of every class are reported together, before any loader or training.
        datasets_base.raise_layout_problems([data for pair in splits for data in pair])

        loaders = []
        for test_set, train_set in splits:
            test_loader = make_loader(test_set, batch_size, num_workers, shuffle=False)
            test_loader.name = f"{name}_{test_set.classname}"
            test_loader.dataset_config = {
                "name": name, "data_path": os.path.abspath(data_path), "aug_path": os.path.abspath(aug_path),
                "classname": test_set.classname, "batch_size": batch_size, **options,
                "resize_used": test_set.resize, "imagesize_used": test_set.imgsize,
            }
            if train_set is None:
                train_loader = test_loader
                LOGGER.info("Dataset %s: train=0 test=%d", f"{test_set.classname.upper():^20}", len(test_set))
            else:
                train_loader = make_loader(train_set, batch_size, num_workers, shuffle=True)
                train_loader.name = test_loader.name
                LOGGER.info("Dataset %s: train=%d test=%d", f"{test_set.classname.upper():^20}", len(train_set),
                            len(test_set))  # the reference's line
            loaders.append({"training": train_loader, "testing": test_loader})
        return loaders

    get_dataloaders.options = {  # for run.json
        "name": name, "data_path": os.path.abspath(data_path), "aug_path": os.path.abspath(aug_path),
        "subdatasets": list(subdatasets), "batch_size": batch_size, "num_workers": num_workers, **options,
    }
    return "get_dataloaders", get_dataloaders


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--subdataset", "-d", required=True, multiple=True, help="Trained class to use, e.g. -d bottle (one).")
@click.option("--dataset", "dataset_name", default="mvtec", show_default=True,
              help="Dataset name used at training; the model is <results_path>/models/backbone_<i>/<dataset>_<class>.")
@click.option("--backbone_index", default=0, type=click.IntRange(min=0), show_default=True, help="Which backbone_<i> folder.")
@click.option("--threshold", type=FiniteRange(), default=None,
              help="Score at or above which an image is anomalous. Default: <class folder>/threshold.json, chosen on the test set when missing.")
@click.option("--calibrate", is_flag=True, help="Choose the threshold on the test set again (F1-best) and rewrite threshold.json.")
@click.option("--output", type=str, default=None, help="Folder for predictions.csv and the PNGs [default: <results_path>/predict/<dataset>_<class>].")
@click.option("--data_path", type=str, default=None, help="Dataset root for calibration [default: the one recorded in config.json].")
@click.option("--batch_size", default=8, type=click.IntRange(min=1), show_default=True, help="Images per forward pass.")
@click.option("--fuse_head", is_flag=True, help="Score through the fused head, as net --fuse_head (faster; other last bits).")
def predict(inputs, subdataset, dataset_name, backbone_index, threshold, calibrate, output, data_path, batch_size,
            fuse_head):
    """Score new images with a trained class. INPUTS: image files, folders (recursive) or quoted glob patterns.

    Chained after `net ... dataset NAME ...`, it scores with the class just trained (NAME unless --dataset is given).
    """
    context = click.get_current_context()
    if len(subdataset) > 1:
        raise GlassError(f"predict scores one class, not {', '.join(subdataset)}: give -d once, and run predict again "
                         "for another class")
    subdataset = subdataset[0]
    # In a chain, click reads everything after the first input as inputs, options and commands included.
    command = next((arg for arg in inputs if arg in main.commands and not os.path.exists(arg)), None)
    if command is not None:
        raise GlassError(f"{command} comes after predict's images: predict comes last, once (e.g. net ... dataset ... "
                         f"predict -d {subdataset} IMAGES)")
    options = {opt: param for param in context.command.params for opt in param.opts}
    options.update({name: None for name in context.help_option_names})
    late = next((arg for arg in inputs if arg.split("=", 1)[0] in options and not os.path.exists(arg)), None)
    if late is not None:
        param = options[late.split("=", 1)[0]]
        shown = late if "=" in late or param is None or getattr(param, "is_flag", False) else f"{late} ..."
        raise GlassError(f"{late} comes after the images: give predict's options before its INPUTS, e.g. "
                         f"predict -d {subdataset} {shown} {inputs[0]}")
    name_given = context.get_parameter_source("dataset_name") != click.core.ParameterSource.DEFAULT

    def class_folder(results_path: str, trained_name: Optional[str]) -> tuple[str, str]:
        """(dataset name, class folder): the chained run's NAME unless --dataset is given."""
        name = trained_name if trained_name is not None and not name_given else dataset_name
        return name, utils.class_dir(results_path, f"{name}_{subdataset}", backbone_index)

    def output_dir(results_path: str, dataset_name: str) -> str:
        return output or os.path.join(results_path, "predict", utils.output_name(f"{dataset_name}_{subdataset}",
                                                                                 backbone_index))

    def check_before_training(results_path: str, trained_name: str, trained_classes: Sequence[str]) -> None:
        """Chained after training: the inputs and the class, checked before the training starts."""
        name, class_dir = class_folder(results_path, trained_name)
        image_inputs.collect_images(inputs, output_dir(results_path, name))
        if not (name == trained_name and subdataset in trained_classes) and not os.path.isdir(class_dir):
            raise GlassError(f"predict -d {subdataset}: neither trained by this run ({trained_name}: "
                             f"{', '.join(trained_classes)}) nor in {class_dir}: name one of the classes")

    def run_predict(results_path: str, device: torch.device, trained_name: Optional[str] = None) -> None:
        dataset_name, class_dir = class_folder(results_path, trained_name)
        if not os.path.isdir(class_dir):
            raise GlassError(f"no trained class folder {class_dir}{glass.trained_there(class_dir)}: check --results_path, "
                             "-d and --dataset, or train the class first")
        out_dir = output_dir(results_path, dataset_name)
        paths = image_inputs.collect_images(inputs, out_dir)
        model, config = glass.load_trained(class_dir, device=device)
        model.fuse_head = fuse_head

        def make_test_loader() -> torch.utils.data.DataLoader:
            recorded = config.get("dataset", {})
            root = data_path or recorded.get("data_path")
            name = recorded.get("name", dataset_name)
            if not root or not os.path.isdir(root):
                raise GlassError(f"the test set to choose a threshold on is not at {root}: pass --data_path or --threshold")
            test_set = loader_class(name)(
                root, recorded.get("aug_path", root), dataset_name=name, split=datasets_base.DatasetSplit.TEST,
                classname=recorded.get("classname", subdataset), resize=recorded.get("resize", config["input_shape"][-1]),
                imagesize=recorded.get("imagesize", config["input_shape"][-1]),
            )
            loader = make_loader(test_set, batch_size, 0, shuffle=False)
            loader.name = f"{name}_{test_set.classname}"
            return loader

        record = glass.choose_threshold(model, class_dir, make_test_loader, threshold, calibrate)
        rows = glass.predict_images(model, config, paths, out_dir, record["threshold"], batch_size)
        flagged = sum(row["anomalous"] == "1" for row in rows)
        click.echo(f"{dataset_name}_{subdataset}: {flagged} of {len(rows)} image(s) anomalous at threshold "
                   f"{record['threshold']:.6f} ({str(record['method']).split(';')[0]})")
        click.echo(f"Predictions: {os.path.join(out_dir, utils.PREDICTIONS_CSV)}")

    run_predict.check_before_training = check_before_training
    return "predict", run_predict


def make_loader(data: torch.utils.data.Dataset, batch_size: int, num_workers: int, shuffle: bool
                ) -> torch.utils.data.DataLoader:
    """A DataLoader with the reference's settings (prefetch 2, pinned memory on CUDA).

    The anomaly synthesis (texture, Perlin mask, blending) runs in ``__getitem__``, so in the workers.
    Workers are not persistent: a persistent training loader's workers would carry their random
    generators from epoch to epoch, which a resumed run cannot restore (it would no longer end as an
    uninterrupted run), and every class's loaders are built up front, so persistent test workers would
    stay alive for the whole run; with the feature cache the test loader is read once per training anyway.
    """
    import torch

    extra = {"prefetch_factor": 2} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), **extra,
    )


def ensure_writable(path: str) -> str:
    """Create the results folder, or explain why it cannot be written."""
    if not path:
        raise GlassError("--results_path is empty: give a folder, e.g. --results_path results")
    if os.path.exists(path) and not os.path.isdir(path):
        raise GlassError(f"--results_path {path} is a file: choose a folder")
    if not utils.is_utf8(os.path.abspath(path)):
        raise GlassError(f"--results_path {os.path.abspath(path)} is not valid UTF-8, and TensorBoard writes only to such "
                         "paths: choose a folder whose path is valid UTF-8")
    try:
        utils.make_writable_folder(path)
    except OSError as exc:
        raise GlassError(f"cannot write to --results_path {path} ({exc.strerror or exc}): choose a writable folder") from None
    return path


@main.result_callback()
def run(methods, results_path, gpu, seed, log_group, log_project, run_name, test, worker_class, worker_gpu, worker_output):
    """Train and/or test every class, printing metrics and rewriting results.csv after each one.

    A class whose training was interrupted resumes from its ``ckpt.pth``; a finished one is only
    tested. The run is recorded in ``<results>/run_<timestamp>.json`` and ``<results>/run.json``.
    With several ``--gpu`` ids the classes run in worker processes, one per GPU at a time (:func:`_run_parallel`).
    """
    methods = dict(methods)
    predict_images = methods.pop("predict", None)
    ctx = click.get_current_context()
    if isinstance(ctx.obj, dict):  # what cli's messages about rerunning say
        ctx.obj["trains"] = bool(methods) and test == "ckpt"
    if worker_output is not None:  # a worker process of a parallel run: one class, results to worker_output
        _run_worker(methods, results_path, worker_class, worker_gpu, worker_output, seed, test)
        return
    if predict_images is not None and not methods:  # `predict` alone: score images with a trained class
        predict_images(results_path, utils.select_device(gpu))
        return
    missing = [cmd for cmd, key in (("net", "get_glass"), ("dataset", "get_dataloaders")) if key not in methods]
    if missing:
        raise GlassError(f"missing subcommand(s): {', '.join(missing)}; usage: python main.py [OPTIONS] net [OPTIONS] dataset [OPTIONS] NAME DATA_PATH AUG_PATH")
    for name in methods["get_glass"].options["backbone_names"]:  # a bad .seed-N suffix, before anything is written
        backbones.parse_backbone_name(name)  # (not in `net`: later option mistakes answer without importing torch)
    results_path = ensure_writable(results_path)
    dataset_options = methods["get_dataloaders"].options
    if predict_images is not None:
        predict_images.check_before_training(results_path, dataset_options["name"], dataset_options["subdatasets"])
    excel_dir = utils.excel_dir(results_path)
    list_of_dataloaders = methods["get_dataloaders"](test, excel_dir)  # checks every class before any training
    workers = plan_workers(gpu, [loaders["testing"].name for loaders in list_of_dataloaders])
    device = utils.select_device(gpu)
    group_options = dict(results_path=results_path, gpu=list(gpu), seed=seed, log_group=log_group,
                         log_project=log_project, run_name=run_name, test=test)
    record = RunRecord(results_path, group_options, methods, device)
    table = ResultsTable(results_path, len(list_of_dataloaders), record)
    try:
        if workers:
            judged = _run_parallel(list_of_dataloaders, results_path, workers, table, record)
        else:
            judged = _run_classes(methods, list_of_dataloaders, results_path, excel_dir, device, seed, test,
                                  table.add, record.add_stopped)
        if judged:
            path = utils.record_distributions(excel_dir, list_of_dataloaders[0]["testing"].dataset_config["name"], judged)
            LOGGER.info("Distribution judgements written to %s", path)
            if dataset_options["distribution"] == 1:
                click.echo(f"--distribution 1 judges only: {', '.join(f'{name} {flag}' for name, flag in judged.items())} "
                           f"(0 manifold, 1 hypersphere) recorded in {path}, nothing trained; rerun with "
                           "--distribution 0 to train with them")
        table.finish()
        stopped = record.data["stopped"]
        if stopped:
            raise GlassError(stopped[0] if len(stopped) == 1 else f"{len(stopped)} classes stopped: " + " | ".join(stopped))
    except BaseException as exc:
        record.finish("interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {utils.error_message(exc)}")
        raise
    record.finish("finished")
    if predict_images is not None:  # chained after training/testing: score the images with the new checkpoint
        predict_images(results_path, device, dataset_options["name"])


def _run_classes(methods, list_of_dataloaders, results_path, excel_dir, device, seed, test,
                 add_result: Callable[[int, str, List[float]], None],
                 add_stopped: Callable[[str], None], say: Callable[[str], None] = click.echo,
                 log_lone_stop: bool = False) -> Dict[str, int]:
    """The per-class loop of :func:`run`: ``add_result(class index, name, metrics)`` (:func:`utils.output_name`) for every
    tested model and ``add_stopped(message)`` for every class that stops (a diverging training, no best
    checkpoint to test), while the others still run; ``say`` prints notes for the user. A stop is logged as an
    error when it happens, unless the class is the run's only model and not ``log_lone_stop`` (the run's final
    error line says it then). Returns the judged distributions."""
    judged: Dict[str, int] = {}
    for index, dataloaders in enumerate(list_of_dataloaders):
        utils.fix_seeds(seed)
        class_key = dataloaders["training"].name  # <dataset>_<class>, e.g. mvtec_bottle
        input_shape = dataloaders["training"].dataset.imagesize  # (3, S, S), as the reference names it
        models = methods["get_glass"](input_shape, device)
        LOGGER.info("Selecting dataset [%s] (%d/%d) %s", class_key, index + 1, len(list_of_dataloaders),
                    datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
        for i, model in enumerate(models):
            if model.backbone.seed is not None:
                utils.fix_seeds(model.backbone.seed)
            model.set_model_dir(utils.models_dir(results_path, i), class_key, results_path=results_path)
            model.excel_dirs = datasets_base.distribution_table_dirs(excel_dir)
            config = {**model.run_config, "dataset": dataloaders["testing"].dataset_config, "seed": seed}
            with utils.file_lock(os.path.join(model.ckpt_dir, CLASS_LOCK), wait=False) as held:
                try:
                    if not held:
                        raise glass.ClassStoppedError(
                            f"another run is training or testing {model.ckpt_dir}: wait for it to end, or use another "
                            "--results_path")
                    # Refuses a folder trained with other model options; records config.json for a new run (judging
                    # only does not use the folder).
                    if not (test == "ckpt" and glass.judges_only(dataloaders["training"])):
                        model.check_config(config, training=test == "ckpt")
                    if test == "ckpt":
                        outcome = model.trainer(dataloaders["training"], dataloaders["testing"], class_key)
                        if model.judged_distribution is not None:
                            judged[class_key] = model.judged_distribution
                        if isinstance(outcome, int):  # --distribution 1: judged only
                            continue
                        if outcome is None:
                            say(f"{class_key}: already trained ({model.finished_note}), testing its best checkpoint "
                                f"(to train it again, delete {model.ckpt_dir} or use another --results_path)")
                    result = list(model.tester(dataloaders["testing"], class_key))
                    model.record_missing_config(config)
                except (glass.ClassStoppedError, datasets_base.UnreadableImageError) as exc:  # the others still run
                    message = utils.error_message(exc)
                    message = message if message.startswith(f"{class_key}: ") else f"{class_key}: {message}"
                    if log_lone_stop or len(list_of_dataloaders) > 1 or len(models) > 1:
                        LOGGER.error("%s", message)
                    add_stopped(message)
                    continue
                finally:
                    model.close()
            add_result(index, utils.output_name(class_key, i), result)
    return judged


def metrics_line(name: str, result: Sequence[float]) -> str:
    """``<name>: image_auroc:97.50 ...`` (percent), the line printed after every tested class."""
    return name + ": " + " ".join(
        f"{key}:{utils.format_metric(value)}" if key != "best_epoch" else f"{key}:{int(value)}"
        for key, value in zip(utils.METRIC_NAMES, result)
    )


RESULTS_LOCK = ".results.lock"  # <results>/.results.lock: held while results.csv and the summaries are rewritten
CLASS_LOCK = ".lock"  # <class folder>/.lock: held by the run that trains or tests the class


class ResultsTable:
    """The rows of ``results.csv`` (in ``-d`` order, whichever class finishes first), rewritten with
    ``summary.md`` and ``summary.csv`` after every tested class; the summary is printed at the end.

    Rows that earlier runs wrote for classes this run does not test are kept, first, and count in the Mean
    (the reference rewrites the table with the run's classes only, losing the others' rows). The table is read
    before each rewrite, under a lock, so that runs sharing the results folder keep each other's rows.
    """

    def __init__(self, results_path: str, n_classes: int, record: "RunRecord") -> None:
        self.results_path = results_path
        self.record = record
        self.slots: List[List[tuple]] = [[] for _ in range(n_classes)]  # (row name, metrics) per class

    def _earlier_rows(self) -> List[tuple]:
        """(row name, metrics) of the results.csv already in the results folder, Mean left out."""
        path = os.path.join(self.results_path, utils.RESULTS_CSV)
        if not os.path.isfile(path):
            return []
        try:
            return utils.read_result_rows(path)
        except (OSError, ValueError, IndexError) as exc:
            utils.keep_unreadable(path, exc, "starting a new table")
            return []

    def add(self, index: int, name: str, result: Sequence[float]) -> None:
        """Record a tested model's metrics under ``name`` (its results.csv row and run-record key): print them,
        rewrite results.csv and the summaries, update the run record."""
        self.slots[index].append((name, list(result)))
        click.echo(metrics_line(name, result))
        rows = [entry for slot in self.slots for entry in slot]
        this_run = {row_name for row_name, _ in rows}
        with utils.file_lock(os.path.join(self.results_path, RESULTS_LOCK)):
            earlier = self._earlier_rows()  # with the rows that another run on this folder wrote meanwhile
            rows = [entry for entry in earlier if entry[0] not in this_run] + rows
            utils.compute_and_store_final_results(self.results_path, [r for _, r in rows], utils.METRIC_NAMES,
                                                  row_names=[row_name for row_name, _ in rows])
            with utils.never_fatal(utils.SUMMARY_MD):
                utils.write_summary(self.results_path)
        self.record.add_result(name, result)

    def finish(self) -> None:
        """Print the summary's Markdown table (all classes and the mean) and where the results are."""
        if not any(self.slots):
            return
        with utils.never_fatal(utils.SUMMARY_MD):
            click.echo(utils.write_summary(self.results_path))
        click.echo(f"Results: {os.path.join(self.results_path, utils.RESULTS_CSV)} "
                   f"(in percent: {utils.SUMMARY_MD}, {utils.SUMMARY_CSV})")


# --------------------------------------------------------------------------------------------------
# Several GPUs: every class in a worker process (`python main.py` with the same arguments, one class,
# one device), at most one class per device at a time; the parent merges the rows into one results.csv.

CPU_WORKERS_ENV = "GLASS_CPU_WORKERS"  # N: without CUDA, use N worker processes on the CPU (tests the scheduling)
WORKERS_FOLDER = "workers"  # <results>/workers/<name>_<class>.log: the output of each class's worker process


def command_argv() -> List[str]:
    """The arguments of this command line (as given to :func:`cli`, else ``sys.argv``)."""
    ctx = click.get_current_context(silent=True)
    argv = (ctx.obj or {}).get("argv") if ctx is not None and isinstance(ctx.obj, dict) else None
    return list(argv if argv is not None else sys.argv[1:])


def plan_workers(gpu_ids: Sequence[int], class_names: Sequence[str]) -> List[int]:
    """The device of each worker process of a parallel run (-1: the CPU), or [] to run the classes one
    after another in this process: one distinct non-negative ``--gpu`` id or one class, or no CUDA device
    (unless :data:`CPU_WORKERS_ENV` asks for CPU workers). ``dataset`` refuses a class given twice."""
    import torch

    ids = list(dict.fromkeys(g for g in gpu_ids if g >= 0))
    if len(ids) < 2 or len(class_names) < 2:
        return []
    if torch.cuda.is_available():
        utils.check_gpu_ids(ids)
        return ids[:len(class_names)]
    wanted = os.environ.get(CPU_WORKERS_ENV, "").strip()
    if wanted:
        if not (wanted.isascii() and wanted.isdigit()) or int(wanted) < 1:
            raise GlassError(f"{CPU_WORKERS_ENV}={wanted} is not a number of worker processes: set it to 1 or more, or unset it")
        count = min(int(wanted), len(class_names))
        click.echo(f"no CUDA device: {count} worker processes on the CPU ({CPU_WORKERS_ENV}={wanted})", err=True)
        return [-1] * count
    where = "MPS" if torch.backends.mps.is_available() else "CPU"
    click.echo(f"no CUDA device: running on {where}, one class at a time", err=True)
    return []


def device_label(gpu: int) -> str:
    """A worker's device as logs name it: ``cpu`` for -1, else ``cuda:<id>``."""
    return "cpu" if gpu < 0 else f"cuda:{gpu}"


def run_scheduled(tasks: Sequence[Any], devices: Sequence[Any], start: Callable[[Any, Any], Any],
                  finished: Callable[[Any, Any, int], Optional[BaseException]], poll_seconds: float = 0.2,
                  terminated: Optional[Callable[[Any, Any, int], None]] = None) -> None:
    """Run the tasks in order as processes, at most one per entry of ``devices`` at a time.

    ``start(task, device)`` returns a started process (``poll``, ``terminate``, ``wait``, ``kill``);
    ``finished(task, device, exit code)`` takes its results and returns an exception when the run must stop.
    Then no further task starts, the running ones finish (their results are kept) and that exception is
    raised. If this process is interrupted, the running processes are terminated (a class resumes from its
    ``ckpt.pth`` on the next run) and ``terminated(task, device, exit code)`` is told of each; an interruption
    waits while a task starts or its results are taken.
    """
    pending, free = list(tasks), list(devices)
    running: Dict[Any, tuple] = {}
    failure: Optional[BaseException] = None
    try:
        while running or (pending and failure is None):
            while pending and free and failure is None:
                with utils.interruptions_deferred():  # a process started is a process in `running`
                    task, device = pending.pop(0), free.pop(0)
                    running[start(task, device)] = (task, device)
            time.sleep(poll_seconds)
            for process, (task, device) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                with utils.interruptions_deferred():  # a finished task's results are taken whole
                    error = finished(task, device, code)  # raising, it is still in `running` and told of
                    del running[process]
                    free.append(device)
                if error is not None and failure is None:
                    failure = error
                    if running or pending:
                        LOGGER.warning("%s; starting no further class, waiting for the %d running one(s)",
                                       utils.error_message(error), len(running))
    except BaseException:
        for process in running:
            process.terminate()
        for process, (task, device) in running.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if terminated is not None:
                terminated(task, device, process.returncode)
        raise
    if failure is not None:
        raise failure


def last_error_line(log_path: str, offset: int = 0) -> Optional[str]:
    """The message of the last ``Error: ...`` line of a worker's output from byte ``offset`` on (how :func:`cli`
    reports a mistake)."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(offset)
            lines = re.split(r"[\r\n]+", handle.read().decode(errors="replace"))
    except OSError:
        return None
    errors = [line[len("Error: "):].strip() for line in lines if line.startswith("Error: ")]
    return errors[-1] if errors else None


def _run_parallel(list_of_dataloaders, results_path: str, devices: Sequence[int], table: ResultsTable,
                  record: "RunRecord") -> Dict[str, int]:
    """Every class in a worker process on ``devices``; their rows go into ``table`` and their stopped classes into
    ``record`` as they finish. Returns the judged distributions."""
    names = [loaders["testing"].name for loaders in list_of_dataloaders]
    classnames = [loaders["testing"].dataset_config["classname"] for loaders in list_of_dataloaders]
    folder = os.path.join(results_path, WORKERS_FOLDER)
    os.makedirs(folder, exist_ok=True)
    argv = command_argv()
    judged: Dict[str, int] = {}
    env = dict(os.environ)
    if all(device < 0 for device in devices):
        # CPU workers keep the default thread counts (fewer threads change the last digits of some metrics);
        # passive OpenMP waiting keeps them from spinning against each other on the shared cores.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    record.data["devices"] = [device_label(device) for device in dict.fromkeys(devices)]
    record.data["workers"] = {}
    click.echo(f"{len(names)} classes on {len(devices)} worker processes ({', '.join(record.data['devices'])}); "
               f"their output: {folder}")

    def paths(index: int) -> tuple:
        return os.path.join(folder, f"{names[index]}.json"), os.path.join(folder, f"{names[index]}.log")

    log_starts: Dict[int, int] = {}  # where this run's part of each worker's log begins (earlier runs' parts kept)

    def start(index: int, device: int) -> subprocess.Popen:
        output, log = paths(index)
        if os.path.exists(output):
            os.remove(output)
        command = [sys.executable, os.path.join(REPO_ROOT, "main.py"), "--worker_class", classnames[index],
                   "--worker_gpu", str(device), "--worker_output", output, *argv]
        with open(log, "a") as handle:
            if handle.tell() > 0:
                handle.write("\n")
            handle.write(f"==== {datetime.now().isoformat(timespec='seconds')}: {names[index]} on "
                         f"{device_label(device)} ====\n")
            handle.flush()
            log_starts[index] = handle.tell()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                       env=env, cwd=os.getcwd(), preexec_fn=utils.die_with_parent)
        LOGGER.info("%s: started on %s (pid %d, output in %s)", names[index], device_label(device), process.pid, log)
        record.data["workers"][names[index]] = {
            "device": device_label(device), "pid": process.pid, "log": log,
            "started": datetime.now().isoformat(timespec="milliseconds"), "finished": None, "exit_code": None,
        }
        record.write()
        return process

    def ended(index: int, device: int, code: int) -> None:  # the record is written by the caller (or run's end)
        record.data["workers"][names[index]].update(finished=datetime.now().isoformat(timespec="milliseconds"),
                                                    exit_code=code)

    def finished(index: int, device: int, code: int) -> Optional[BaseException]:
        output, log = paths(index)
        outcome: Dict[str, Any] = {}
        if os.path.isfile(output):
            with open(output) as handle:
                outcome = json.load(handle)
            os.remove(output)
        ended(index, device, code)
        for message in outcome.get("warnings", []):
            LOGGER.warning("%s (worker): %s", names[index], message)
        for message in outcome.get("notes", []):
            click.echo(message)
        for name, result in outcome.get("results", []):
            table.add(index, name, result)  # also rewrites the run record
        record.write()
        judged.update(outcome.get("judged", {}))
        for message in outcome.get("stopped", []):
            record.add_stopped(message)
        if code == 0 and outcome.get("finished"):
            return None
        message = last_error_line(log, log_starts[index])
        if message is not None:
            return GlassError(message)
        return GlassError(worker_failure(names[index], device_label(device), code, log))

    run_scheduled(range(len(names)), devices, start, finished, terminated=ended)
    return judged


def worker_failure(name: str, device: str, code: int, log: str) -> str:
    """What to say of a worker process that ended without an error line of its own."""
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
        return (f"{name}: its worker process on {device} {how} (out of memory, or stopped from outside); the same "
                f"command resumes it from its ckpt.pth (log: {log})")
    return f"{name}: its worker process on {device} ended with exit code {code}; see {log}"


def _run_worker(methods, results_path: str, classname: str, gpu: int, output: str, seed: int, test: str) -> None:
    """One class of a parallel run on one device: its results go to ``output`` (JSON), not to results.csv."""
    if classname is None or gpu is None:
        raise GlassError("--worker_output is set by a parallel run for its worker processes only")
    results_path = ensure_writable(results_path)
    excel_dir = utils.excel_dir(results_path)
    list_of_dataloaders = methods["get_dataloaders"](test, excel_dir, classes=[classname])
    device = utils.select_device([gpu])
    # "notes" and "warnings": what the parent prints when this worker ends (its console shows no worker output).
    outcome: Dict[str, Any] = {"results": [], "judged": {}, "stopped": [], "notes": [], "warnings": [],
                               "finished": False}

    def save() -> None:
        utils.atomic_write(output, lambda tmp: utils.write_json(tmp, outcome))

    def say(message: str) -> None:
        click.echo(message)
        outcome["notes"].append(message)

    def add_result(index: int, name: str, result: List[float]) -> None:
        outcome["results"].append([name, [value if isinstance(value, int) else float(value) for value in result]])
        click.echo(metrics_line(name, result))
        save()

    def add_stopped(message: str) -> None:
        outcome["stopped"].append(message)
        save()

    warnings = WarningCollector(outcome["warnings"])  # the loaders' warnings were the parent's own
    logging.getLogger().addHandler(warnings)
    try:
        judged = _run_classes(methods, list_of_dataloaders, results_path, excel_dir, device, seed, test, add_result,
                              add_stopped, say, log_lone_stop=True)  # for the worker's log
    except BaseException:
        with contextlib.suppress(GlassError):  # what it has to say still reaches the parent; the error goes on
            save()
        raise
    finally:
        logging.getLogger().removeHandler(warnings)
    outcome.update(judged=judged, finished=True)
    save()


class WarningCollector(logging.Handler):
    """Keeps the messages of WARNING records (not errors: a worker's errors reach its parent otherwise)."""

    def __init__(self, into: List[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            self.into.append(record.getMessage())


class RunRecord:
    """``<results>/run_<timestamp>.json`` (and a copy as ``run.json``): how a run was made and how it ended.

    Holds the command line, every option, the device, torch's thread count, Python, platform and package
    versions, the git commit of this code (``unknown`` outside a git checkout), start and end times, status and results; a
    parallel run adds ``devices`` and ``workers`` (per class: device, pid, log, start, end, exit code).
    """

    def __init__(self, results_path: str, group_options: dict, methods: dict, device: torch.device) -> None:
        import platform

        import torch

        started = datetime.now()
        stamp = started.strftime("%Y%m%d-%H%M%S")
        self.path = os.path.join(results_path, f"run_{stamp}.json")
        suffix = 1
        while os.path.exists(self.path):
            suffix += 1
            self.path = os.path.join(results_path, f"run_{stamp}-{suffix}.json")
        self.latest = os.path.join(results_path, "run.json")
        self.data = {
            "command_line": ["main.py", *command_argv()],
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
            "torch_threads": torch.get_num_threads(),  # another count gives other last bits on the CPU
            "git_commit": utils.git_commit(REPO_ROOT),
            "started": started.isoformat(timespec="seconds"),
            "finished": None,
            "status": "running",
            "results": {},
            "stopped": [],
        }
        self.write()

    def add_result(self, name: str, result: List[float]) -> None:
        """Store a class's metrics (null where not available) and rewrite the record."""
        self.data["results"][name] = dict(zip(utils.METRIC_NAMES, [None if not math.isfinite(v) else float(v) for v in result]))
        self.write()

    def add_stopped(self, message: str) -> None:
        """Record a class that stopped (its one-line message) as it happens, so that a later failure keeps it."""
        self.data["stopped"].append(message)
        self.write()

    def finish(self, status: str) -> None:
        """Record how the run ended (finished, interrupted, failed: ...) and when; a failed write only warns."""
        self.data.update(status=status, finished=datetime.now().isoformat(timespec="seconds"))
        try:
            self.write()
        except (OSError, GlassError) as exc:  # never hide the run's own outcome behind a failed record
            LOGGER.warning("Could not update %s (%s)", self.path, exc)

    def write(self) -> None:
        """Rewrite run_<timestamp>.json and its copy run.json, each atomically."""
        for path in (self.path, self.latest):
            utils.atomic_write(path, lambda tmp: utils.write_json(tmp, self.data))


OPTION_PLACES = {
    "main.py": "give it before `net`",
    "net": "give it after `net`, before `dataset`",
    "dataset": "give it after `dataset`, before NAME DATA_PATH AUG_PATH",
    "predict": "give it after `predict`, before the images",
}


def misplaced_option_hint(exc: click.UsageError, args: Sequence[str]) -> str:
    """`` (--x is a `dataset` option: give it ...)`` when a usage error comes from an option given in another
    place of the chain than the command it belongs to; "" otherwise."""
    name = None
    if isinstance(exc, click.NoSuchOption):
        name = exc.option_name
    elif isinstance(exc, click.MissingParameter) and exc.param is not None:
        name = next((opt for opt in exc.param.opts if opt in args), None)  # given, but after the arguments
    else:
        found = re.search(r"No such command '(-[^']+)'", exc.format_message())
        name = found.group(1) if found else None
    if not name:
        return ""
    commands = {"main.py": main, **main.commands}
    owners = [label for label, command in commands.items()
              if any(name in param.opts or name in param.secondary_opts for param in command.params)]
    if isinstance(exc, click.MissingParameter) and exc.ctx is not None and exc.ctx.info_name in owners:
        owners = [exc.ctx.info_name]  # its own missing option (-d is predict's as well as dataset's)
    if not owners:
        return ""
    where = "an option of main.py itself" if owners[0] == "main.py" else f"a `{owners[0]}` option"
    return f" ({name} is {where}: {OPTION_PLACES[owners[0]]})"


def cli(argv: List[str] | None = None) -> int:
    """Entry point: user mistakes end with one line on stderr and exit code 2, no traceback."""
    utils.escape_undecodable_output()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)  # Python warnings (Pillow's about huge images, say) as log lines
    utils.quiet_tensorboard_thread_errors()
    args = sys.argv[1:] if argv is None else list(argv)
    if "--help" not in args:
        LOGGER.info("Command line arguments: %s", " ".join([sys.argv[0] if argv is None else "main.py", *args]))
    if utils.keep_freed_memory():
        LOGGER.debug("glibc malloc keeps freed memory for reuse (GLASS_MALLOC=system to leave its defaults)")
    state = {"argv": args}  # run() adds "trains": whether the command trains (or tests) classes
    try:
        with utils.termination_as_interrupt():
            main.main(args=args, prog_name="main.py", standalone_mode=False, obj=state)
    except GlassError as exc:
        click.echo(f"Error: {utils.error_message(exc)}", err=True)
        return 2
    except click.exceptions.Abort as exc:  # Ctrl-C, or SIGTERM/SIGHUP (utils.termination_as_interrupt)
        again = ("rerun the same command to go on (training resumes after its last finished epoch)"
                 if state.get("trains", True) else "rerun the same command to run it again")
        if isinstance(exc.__cause__, utils.Terminated):
            click.echo(f"Terminated ({exc.__cause__}): {again}.", err=True)
            return 128 + getattr(signal, str(exc.__cause__)).value
        click.echo(f"Interrupted (Ctrl-C): {again}.", err=True)
        return 130
    except OSError as exc:  # the environment, not the code: a full disk, a file where a folder must be, ...
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"Error: {where}{exc.strerror or exc}: {utils.write_advice(exc)}", err=True)
        return 2
    except (RuntimeError, MemoryError) as exc:
        trains = state.get("trains", True)
        message = utils.loader_failure_message(exc, trains) or utils.out_of_memory_message(exc, trains)  # the machine
        if message is None:
            raise
        click.echo(f"Error: {message}", err=True)
        return 2
    except click.UsageError as exc:  # one line for the mistake, one for where to look
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())) and exc.ctx is not None:
            click.echo(exc.ctx.get_help(), err=True)  # no arguments at all: the help, as click shows it
            return 2
        click.echo(f"Error: {' '.join(exc.format_message().split())}{misplaced_option_hint(exc, args)}", err=True)
        if exc.ctx is not None:
            click.echo(f"Try '{exc.ctx.command_path} --help' for help.", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

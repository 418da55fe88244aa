"""Export a trained GLASS class to ONNX: image batch -> ``image_score`` (B,) and ``anomaly_map`` (B, H, W).

The exported graph is the whole inference path of ``GLASS._predict``: backbone up to the deepest
feature layer, patch neighbourhoods, alignment of the deeper layers, the two average-pooling
reductions, feature adaptor, discriminator, image score (max patch score), bilinear upsampling and
the Gaussian smoothing of the map (scipy's ``gaussian_filter(sigma=4)``, written as two fixed 1-D
convolutions over a 'reflect'-padded map), built by ``onnx/glass_graph.py``. The batch axis is dynamic. How to preprocess an image
(resize, crop, ImageNet mean/std) is recorded in the model's ``metadata_props``; ``onnx/ort.py``
reads it from there.

Examples::

    python onnx/pth2onnx.py --results_path results -d tire            # results/models/backbone_0/mvtec_tire/glass.onnx
    python onnx/pth2onnx.py --class_dir results/models/backbone_0/mvtec_bottle
    python onnx/pth2onnx.py --checkpoint ckpt_best_219.pth -b wideresnet50 -le layer2 -le layer3 \\
        --pretrain_embed_dimension 1536 --imagesize 288 --resize 288 --class_name grid_cloth

Differences from the reference's ``onnx/pth2onnx.py``: no paths in the file, a dynamic batch (the
reference fixed 8 images at 288 px on CUDA), and the image score and the smoothed map come out of the
graph (the reference returned the raw patch-score grid and left upsampling and blur to the caller).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
for folder in (REPO_ROOT, HERE):  # the project's modules, and glass_graph.py beside this file
    if folder not in sys.path:
        sys.path.insert(0, folder)

from datasets import LOADERS  # noqa: E402
import utils  # noqa: E402
from utils import GlassError  # noqa: E402

# torch, glass and the graph module (glass_graph.py) take seconds to import: the functions that need them
# import them, so that --help and the checks of the command line answer at once.
if TYPE_CHECKING:
    import glass
    from glass_graph import GlassOnnx

LOGGER = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("image_score", "anomaly_map")
DEFAULT_NAME = "glass.onnx"
SMOOTHING_SIGMA = 4.0
# Paper settings (shell/run-mvtec.sh), used for a bare checkpoint without config.json.
PAPER_DEFAULTS = {
    "backbone": "wideresnet50",
    "layers": ["layer2", "layer3"],
    "imagesize": 288,
    "resize": 288,
    "pretrain_embed_dimension": 1536,
    "patchsize": 3,
}


def supported_opsets() -> Tuple[int, int]:
    """The opsets the installed exporter writes: torchlib's own (18 in torch 2.x) up to the newest of onnx's version converter.

    Below torchlib's opset torch converts the graph down, which fails for every GLASS graph (the patch
    neighbourhoods are padded, and onnx has no Pad adapter below 18) and then silently keeps torchlib's
    opset; above the converter's newest it does the same.
    """
    import onnx

    try:
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET
    except ImportError:  # another torch layout: the opset this file was tested with
        TORCHLIB_OPSET = OPSET
    return int(TORCHLIB_OPSET), int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    """Refuse an opset the installed exporter cannot write (before any work)."""
    low, high = supported_opsets()
    if not low <= opset <= high:
        raise GlassError(f"--opset {opset} cannot be written by the installed torch/onnx exporter: choose {low} to {high} (default {OPSET})")


def is_onnx_model(path: str) -> bool:
    """Whether ``path`` holds an ONNX model (a graph with at least one node), read without its external data."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # protobuf's DecodeError and the like: not a model
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def check_output(path: str) -> None:
    """Refuse an output path that names a folder or does not end in ``.onnx``, or an existing file that is not an
    ONNX model (a checkpoint, config.json, ... would be lost)."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise GlassError(f"-o {path} names a directory: give a file path such as {os.path.join(path, DEFAULT_NAME)}")
    if os.path.exists(path) and not is_onnx_model(path):
        raise GlassError(f"-o {path} would overwrite a file that is not an ONNX model: remove it, or give another path "
                         "ending in .onnx")
    if not path.lower().endswith(".onnx"):  # written only as *.onnx, which a later run may replace
        raise GlassError(f"-o {path} does not end in .onnx: give a path such as {os.path.splitext(path)[0]}.onnx")


# --------------------------------------------------------------------------------------------------
# Which model to export

def class_dir_of(results_path: str, class_name: str, dataset: str = "mvtec", backbone_index: int = 0) -> str:
    """``<results>/models/backbone_<i>/<dataset>_<class>``."""
    return utils.class_dir(results_path, f"{dataset}_{class_name}", backbone_index)


def config_from_checkpoint(
    checkpoint: str,
    backbone: str,
    layers: Sequence[str],
    imagesize: int,
    resize: int,
    pretrain_embed_dimension: int,
    patchsize: int,
    class_name: str = "",
    dataset: str = "",
) -> dict:
    """A config.json-like description of a bare checkpoint; the trained parts' sizes are read from it."""
    import glass

    state = glass.read_checkpoint_file(checkpoint, "cpu", fix="give a ckpt_best_<epoch>.pth written by GLASS")
    net = {"pretrain_embed_dimension": int(pretrain_embed_dimension), "patchsize": int(patchsize),
           **glass.trained_part_sizes(state)}
    return {
        "backbone": backbone,
        "layers_to_extract_from": list(layers),
        "input_shape": [3, int(imagesize), int(imagesize)],
        "net": net,
        "dataset": {"name": dataset, "classname": class_name, "resize_used": int(resize), "imagesize_used": int(imagesize)},
    }


def option_flags(key: str, value) -> str:
    """A bare-checkpoint option as it is written on the command line (``-b NAME``, ``-le L -le L``, ``--key V``)."""
    if key == "backbone":
        return f"-b {value}"
    if key == "layers":
        return " ".join(f"-le {layer}" for layer in value)
    return f"--{key} {value}"


def load_for_export(args: argparse.Namespace) -> Tuple[glass.GLASS, dict, str, str]:
    """The model, its config, the checkpoint path and the class folder named by the command line."""
    import glass

    model_options = {
        "backbone": args.backbone, "layers": args.layers_to_extract_from or None, "imagesize": args.imagesize,
        "resize": args.resize, "pretrain_embed_dimension": args.pretrain_embed_dimension, "patchsize": args.patchsize,
    }
    if args.class_dir and args.results_path:
        raise GlassError("give either --class_dir or --results_path with -d, not both")
    class_dir = args.class_dir
    if args.results_path:
        if not args.subdataset:
            raise GlassError("--results_path needs the class: add -d CLASS (and --dataset if it is not mvtec)")
        class_dir = class_dir_of(args.results_path, args.subdataset, args.dataset, args.backbone_index)
    if class_dir is None and args.checkpoint is None:
        raise GlassError("nothing to export: give --results_path R -d CLASS, --class_dir DIR or --checkpoint FILE (see --help)")
    if args.checkpoint is not None:
        if os.path.isdir(args.checkpoint):
            raise GlassError(f"checkpoint {args.checkpoint} is a folder: give a ckpt_best_<epoch>.pth in it, or the folder "
                             "as --class_dir")
        if not os.path.isfile(args.checkpoint):
            raise GlassError(f"checkpoint {args.checkpoint} does not exist: give the path of a ckpt_best_<epoch>.pth")
        glass.read_checkpoint_file(args.checkpoint, "cpu", fix="give a ckpt_best_<epoch>.pth written by GLASS")
        if os.path.basename(args.checkpoint) == glass.TRAINING_CHECKPOINT:
            LOGGER.warning("%s holds the weights of the last epoch trained, not of the best one (ckpt_best_<epoch>.pth): "
                           "exporting them, as asked", args.checkpoint)
    if class_dir is None:
        class_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    elif not os.path.isdir(class_dir):
        raise GlassError(f"class folder {class_dir} does not exist{glass.trained_there(class_dir)}: check --results_path, "
                         "-d and --dataset (or --class_dir)")

    if os.path.isfile(os.path.join(class_dir, glass.CONFIG_NAME)):
        given = [f"--{key}" for key, value in model_options.items() if value is not None]
        if given:
            raise GlassError(f"{', '.join(given)} describe a bare checkpoint, but {class_dir} has a config.json that describes the model: leave them out")
        model, config = glass.load_trained(class_dir, device="cpu", checkpoint=args.checkpoint)
        return model, config, model.checkpoint_path, class_dir
    if args.checkpoint is None:
        if glass.best_checkpoint_in(class_dir) is None:
            if os.path.isdir(os.path.join(class_dir, "models")):
                raise GlassError(f"{class_dir} is a results folder, not a class folder: give --results_path {class_dir} "
                                 "-d CLASS (and --dataset if it is not mvtec)")
            raise GlassError(f"no ckpt_best_*.pth in {class_dir}: train this class first")
        raise GlassError(f"no {glass.CONFIG_NAME} in {class_dir}: point at a class folder written by main.py, or give --checkpoint with the model options")
    options = {key: (PAPER_DEFAULTS[key] if value is None else value) for key, value in model_options.items()}
    defaulted = [key for key, value in model_options.items() if value is None]
    if defaulted:
        LOGGER.warning("%s does not record these options, so the paper's are used: %s. Give the values it was trained "
                       "with: other ones load as well but give other scores", args.checkpoint,
                       " ".join(option_flags(key, PAPER_DEFAULTS[key]) for key in defaulted))
    config = config_from_checkpoint(
        args.checkpoint, options["backbone"], options["layers"], options["imagesize"], options["resize"],
        options["pretrain_embed_dimension"], options["patchsize"], class_name=args.class_name or "", dataset=args.dataset,
    )
    model = glass.build_model(config, device="cpu")
    model.check_imagesize()
    model.load_checkpoint(args.checkpoint)
    return model, config, args.checkpoint, class_dir


def export_metadata(config: dict, checkpoint: str, threshold: Optional[float] = None,
                    fuse_head: bool = False) -> Dict[str, str]:
    """What ``ort.py`` needs to preprocess an image, and where the model came from (all strings)."""
    dataset = config.get("dataset", {})
    input_shape = [int(v) for v in config["input_shape"]]
    resize = dataset.get("resize_used", dataset.get("resize", input_shape[-1]))
    resize = [int(v) for v in resize] if isinstance(resize, (list, tuple)) else [int(resize)]
    metadata = {
        "format": "glass-onnx/1",
        "input_shape": ",".join(map(str, input_shape)),
        "resize": ",".join(map(str, resize)),
        "imagesize": ",".join(map(str, input_shape[-2:])),
        "mean": ",".join(map(str, utils.IMAGENET_MEAN)),
        "std": ",".join(map(str, utils.IMAGENET_STD)),
        "backbone": str(config["backbone"]),
        "layers": ",".join(config["layers_to_extract_from"]),
        "dataset": str(dataset.get("name", "")),
        "class": str(dataset.get("classname", "")),
        "checkpoint": os.path.basename(checkpoint),
        "smoothing_sigma": str(SMOOTHING_SIGMA),
        "outputs": "image_score: max patch score (B,); anomaly_map: upsampled, Gaussian-smoothed patch scores (B,H,W)",
        "head": "fused (--fuse_head)" if fuse_head else "step by step",
    }
    if threshold is not None:
        metadata["threshold"] = repr(float(threshold))
    return metadata


def stored_threshold_value(class_dir: str, checkpoint: str) -> Optional[float]:
    """The threshold in ``<class_dir>/threshold.json`` if it applies to this checkpoint (utils.stored_threshold)."""
    record = utils.stored_threshold(class_dir, checkpoint)
    return None if record is None else record["threshold"]


def export(
    model: glass.GLASS,
    config: dict,
    path: str,
    checkpoint: str = "",
    threshold: Optional[float] = None,
    opset: int = OPSET,
    check: bool = True,
    fuse_head: bool = False,
) -> Dict[str, float]:
    """Write ``model`` to ``path`` as ONNX with metadata; with ``check``, compare onnxruntime to PyTorch.
    ``fuse_head``: the graph of ``--fuse_head`` (``model.FusedHead``), smaller and faster, other last bits.

    Returns ``{"max_abs_score": ..., "max_abs_map": ...}`` of the check (empty without it).
    """
    import onnx
    import torch
    from glass_graph import GlassOnnx

    check_opset(opset)
    check_output(path)
    wrapper = GlassOnnx(model, fuse_head=fuse_head)
    example = torch.zeros(2, *wrapper.input_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    LOGGER.info("Exporting %s to %s (opset %d, dynamic batch)", checkpoint or "the model", path, opset)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, (example,), None, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=False, verbose=False,
            )
    except Exception as exc:  # the exporter's errors are long; keep the whole story in the debug log
        LOGGER.debug("torch.onnx.export failed", exc_info=True)
        raise GlassError(
            f"torch.onnx.export failed for backbone {getattr(model.backbone, 'name', '?')} "
            f"({type(exc).__name__}: {utils.exception_summary(exc)}); "
            "try another --opset, or report it with the backbone name"
        ) from None
    proto = program.model_proto
    written = [entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")]
    if written != [opset]:  # torch converts to other opsets and keeps its own when that fails
        raise GlassError(f"the exporter wrote opset {', '.join(map(str, written))} instead of --opset {opset}: choose --opset {OPSET}")
    for key, value in export_metadata(config, checkpoint, threshold, fuse_head).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "GLASS anomaly detector: image (B,3,H,W) ImageNet-normalised -> image_score (B,), anomaly_map (B,H,W)"
    onnx.checker.check_model(proto)
    diff: Dict[str, float] = {}

    def write_and_check(tmp: str) -> None:  # checked before it replaces an earlier export
        onnx.save(proto, tmp)
        if check:
            diff.update(check_export(wrapper, tmp))

    utils.atomic_write(path, write_and_check, option="-o")
    return diff


def check_export(wrapper: GlassOnnx, path: str, batch: int = 2, seed: int = 0) -> Dict[str, float]:
    """Run a random batch through onnxruntime and through the PyTorch model; the largest differences."""
    import numpy as np
    import onnxruntime
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, *wrapper.input_shape, generator=generator)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    scores, maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        ref_scores, ref_maps = wrapper(images)
    diff = {
        "max_abs_score": float(np.abs(scores - ref_scores.numpy()).max()),
        "max_abs_map": float(np.abs(maps - ref_maps.numpy()).max()),
    }
    LOGGER.info("onnxruntime vs PyTorch on %d random images: score %.2e, map %.2e (max abs)", batch, *diff.values())
    if max(diff.values()) > 1e-3:
        raise GlassError(f"the exported model differs from PyTorch by {max(diff.values()):.2e}: report this with the backbone name")
    return diff


# --------------------------------------------------------------------------------------------------
# Command line

class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default only where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (like the project's other tools)
        self.exit(2, f"Error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def odd_positive_int(text: str) -> int:
    """An argparse type: an odd whole number of at least 1 (main.py's --patchsize)."""
    try:
        return utils.check_odd_patchsize(positive_int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of pth2onnx.py."""
    parser = _Parser(
        prog="python onnx/pth2onnx.py",
        description="Export a trained GLASS class (backbone, feature pipeline, adaptor, discriminator, upsampled and "
                    "Gaussian-smoothed anomaly map) to ONNX with a dynamic batch axis. Name the model with "
                    "--results_path and -d, with --class_dir, or with --checkpoint.",
        formatter_class=_HelpFormatter,
    )
    source = parser.add_argument_group("which model")
    source.add_argument("--results_path", help="results folder of main.py; the class folder is <results_path>/models/backbone_<i>/<dataset>_<class>")
    source.add_argument("-d", "--subdataset", help="class name, with --results_path (e.g. bottle)")
    source.add_argument("--dataset", default="mvtec",
                        help=f"dataset NAME given to main.py at training ({', '.join(sorted(LOADERS))}); part of the class folder name")
    source.add_argument("--backbone_index", type=int, default=0, help="which backbone_<i> folder, with --results_path")
    source.add_argument("--class_dir", help="class folder holding config.json and ckpt_best_<epoch>.pth (instead of --results_path/-d)")
    source.add_argument("--checkpoint", help="checkpoint to export (default: the class folder's ckpt_best_<epoch>.pth); alone, its folder is the class folder")
    bare = parser.add_argument_group("model options, only for a checkpoint whose folder has no config.json (defaults: the paper's MVTec settings)")
    bare.add_argument("-b", "--backbone", help=f"backbone name (default {PAPER_DEFAULTS['backbone']})")
    bare.add_argument("-le", "--layers_to_extract_from", action="append", help="feature layer, repeat for several (default: layer2, layer3)")
    bare.add_argument("--imagesize", type=positive_int, help=f"side of the square model input (default {PAPER_DEFAULTS['imagesize']})")
    bare.add_argument("--resize", type=positive_int, help=f"shorter side after resizing, before the centre crop (default {PAPER_DEFAULTS['resize']})")
    bare.add_argument("--pretrain_embed_dimension", type=positive_int, help=f"per-layer embedding size (default {PAPER_DEFAULTS['pretrain_embed_dimension']})")
    bare.add_argument("--patchsize", type=odd_positive_int, help=f"patch neighbourhood, odd (default {PAPER_DEFAULTS['patchsize']})")
    bare.add_argument("--class_name", help="class name to record in the metadata")
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", help="ONNX file to write, ending in .onnx (default: glass.onnx in the class folder)")
    out.add_argument("--opset", type=int, default=OPSET,
                     help="ONNX opset version (the range the installed exporter writes is checked before any work)")
    out.add_argument("--fuse_head", action="store_true",
                     help="export the fused head of net --fuse_head in place of the patch embedding, projection and "
                          "the discriminator's first Linear layer and BatchNorm (a smaller, faster graph; scores differ "
                          "in the last bits)")
    out.add_argument("--no_check", action="store_true", help="skip comparing onnxruntime with PyTorch on two random images after export")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; user mistakes print one line and exit with code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # onnx_ir's and onnxscript's optimiser passes log every step at INFO; torch logs at INFO only when interrupted
    # during its import (its FakeTensor cache statistics at exit, after the one-line message)
    for noisy in ("onnx_ir", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        check_opset(args.opset)
        if args.output:
            check_output(args.output)
        model, config, checkpoint, class_dir = load_for_export(args)
        output = args.output or os.path.join(class_dir, DEFAULT_NAME)
        threshold = stored_threshold_value(class_dir, checkpoint)
        diff = export(model, config, output, checkpoint=checkpoint, threshold=threshold, opset=args.opset, check=not args.no_check,
                      fuse_head=args.fuse_head)
    except GlassError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # one line, as main.py; the export replaces the file only once it is checked
        print("Interrupted (Ctrl-C): no ONNX file written (an earlier export is left as it was); rerun the same "
              "command to export.", file=sys.stderr)
        return 130
    print(f"Wrote {output}" + (f" (onnxruntime vs PyTorch: score {diff['max_abs_score']:.1e}, map {diff['max_abs_map']:.1e})" if diff else ""))
    if threshold is None:
        print(f"No threshold embedded: {class_dir} has no threshold.json for {os.path.basename(checkpoint)} "
              "(`python main.py ... predict` chooses one; or give ort.py --threshold)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference time per image against its floor, the backbone alone, and where the rest goes.

The predict path is ``GLASS._predict`` (what ``main.py predict`` and every evaluation call per batch):
backbone up to the last wanted layer -> patch embedding (3x3 unfold, bilinear alignment of the deeper
layers, two adaptive average poolings) -> projection + discriminator -> bilinear upsampling -> Gaussian
smoothing (scipy, sigma 4). The floor is the backbone forward alone (``PatchEmbedder.layer_features``:
the hooks stop it after the last wanted layer), on the same images. Each phase is also timed on its own.

``predict (step-by-step embedding)`` is the same predict with the embedding as it was computed before
(``PatchEmbedder.embed_layer_features_stepwise``); the script checks that both give the same bits
(embeddings, scores and anomaly maps) and reports it. ``predict, --fuse_head`` scores the layer maps through
``model.FusedHead`` (embedding, projection and the discriminator's first Linear layer and BatchNorm folded
into a grouped convolution and a matrix product per layer: ``fused head``) and computes the anomaly maps as
matrix products (``RescaleSegmentor.convert_by_products``), which changes the last bits: the script prints
the largest score and map differences.

All timings are interleaved: every repetition runs each measurement once per batch, in a rotating
order, so that a busy machine slows them alike; medians over the repetitions.

    python bench/predict_speed.py                     # CPU calibration profile: EfficientNet-Lite0 128 px, 512-d
    python bench/predict_speed.py --threads 1         # one torch thread
    python bench/predict_speed.py --profile paper     # WideResNet-50 layer2+layer3, 288 px, 1536-d (random backbone weights)
    python bench/predict_speed.py --class_dir results/models/backbone_0/mvtec_tire   # a trained class
    python bench/predict_speed.py --device cuda       # on a GPU (the step-by-step embedding runs there)
    python bench/predict_speed.py --onednn            # the heads' Linear layers through oneDNN (other last bits)
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import utils  # noqa: E402
from utils import DeferredModule, GlassError  # noqa: E402
from bench.machine import DEVICE_CHOICES, bench_device, describe_machine, int_range, synchronize  # noqa: E402

# Imported at first use, so that --help and option mistakes answer without loading torch (seconds).
np = DeferredModule("numpy")
torch = DeferredModule("torch")
backbones = DeferredModule("backbones")
glass = DeferredModule("glass")

DATA_DEFAULT = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")

PROFILES: Dict[str, dict] = {
    # The CPU calibration profile (bench/calibrate.sh).
    "cpu": dict(backbone="efficientnet_lite0", layers=["blocks.2", "blocks.4"], dim=512, dsc_hidden=512, imagesize=128,
                images=32, repeats=7),
    # The tests' tiny profile.
    "tiny": dict(backbone="efficientnet_lite0", layers=["blocks.2", "blocks.4"], dim=128, dsc_hidden=128, imagesize=64,
                 images=32, repeats=7),
    # The paper's MVTec AD setting (random backbone weights when ImageNet ones are not at hand: same time).
    "paper": dict(backbone="wideresnet50", layers=["layer2", "layer3"], dim=1536, dsc_hidden=1024, imagesize=288,
                  images=8, repeats=3),
}
PHASES = ("backbone", "embedding", "embedding, step by step", "projection + discriminator", "upsample", "smoothing",
          "predict", "predict (step-by-step embedding)", "fused head (--fuse_head)", "predict, --fuse_head")


def build(profile: dict, device: torch.device, onednn: bool = False, seed: int = 0) -> glass.GLASS:
    """An untrained GLASS of ``profile`` on ``device`` (the heads' weights do not change the time), with
    ``--onednn`` when ``onednn``."""
    torch.manual_seed(seed)
    try:
        backbone = backbones.load(profile["backbone"])
        weights = "ImageNet weights"
    except GlassError:
        backbone = backbones.load(profile["backbone"], pretrained=False)
        weights = "random weights (no ImageNet weights offline; the time is the same)"
    backbone.name, backbone.seed = profile["backbone"], None
    size = profile["imagesize"]
    model = glass.GLASS(device)
    model.load(backbone=backbone, layers_to_extract_from=profile["layers"], device=device,
               input_shape=(3, size, size), pretrain_embed_dimension=profile["dim"], target_embed_dimension=profile["dim"],
               patchsize=3, dsc_layers=2, dsc_hidden=profile["dsc_hidden"], pre_proj=1, onednn=onednn)
    model.bench_weights = weights
    return model


def tire_images(data: str, size: int, count: int) -> torch.Tensor:
    """The first ``count`` test images of MVTec 3D-AD tire through the test transform, as one tensor."""
    from datasets.mvtec import DatasetSplit, MVTecDataset

    dataset = MVTecDataset(os.path.join(data, "mvtec3d"), os.path.join(data, "dtd", "images"), dataset_name="mvtec",
                           classname="tire", resize=size, imagesize=size, split=DatasetSplit.TEST)
    step = max(1, len(dataset) // count)  # spread over the defect types
    return torch.stack([dataset[i]["image"] for i in range(0, step * count, step)][:count])


def fused_predict(model: glass.GLASS, images: torch.Tensor):
    """``model._predict(images)`` with ``--fuse_head`` on for the call."""
    before, model.fuse_head = model.fuse_head, True
    try:
        return model._predict(images)
    finally:
        model.fuse_head = before


def phase_functions(model: glass.GLASS, images: torch.Tensor) -> Dict[str, Callable[[], object]]:
    """One callable per phase for the batch ``images``; each phase's input is computed once beforehand."""
    import scipy.ndimage as ndimage

    embedder, segmentor = model.embedder, model.anomaly_segmentor
    model._eval_mode()
    with torch.no_grad():
        maps = model._layer_features(images, evaluation=True)
        features, grids = embedder.embed_layer_features(maps)
        scores = model._discriminate(model._project(features))
        grid_scores = scores.reshape(images.shape[0], *grids[0])
        upsampled = segmentor.upsample(grid_scores)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    def predict_stepwise():
        embedder._rows_path_applies = lambda layer_features: False  # the embedding as it was computed before
        try:
            return model._predict(images)
        finally:
            del embedder._rows_path_applies

    return {
        "backbone": no_grad(lambda: model._layer_features(images, evaluation=True)),
        "embedding": no_grad(lambda: embedder.embed_layer_features(maps)),
        "embedding, step by step": no_grad(lambda: embedder.embed_layer_features_stepwise(maps)),
        "projection + discriminator": no_grad(lambda: model._discriminate(model._project(features))),
        "upsample": no_grad(lambda: segmentor.upsample(grid_scores)),
        "smoothing": lambda: [ndimage.gaussian_filter(s, sigma=segmentor.smoothing) for s in upsampled],
        "predict": lambda: model._predict(images),
        "predict (step-by-step embedding)": predict_stepwise,
        "fused head (--fuse_head)": lambda: model._fused_scores(maps),
        "predict, --fuse_head": lambda: fused_predict(model, images),
    }


def same_outputs(model: glass.GLASS, images: torch.Tensor) -> bool:
    """Whether the fast and the step-by-step embedding give the same bits, and so the same scores and maps."""
    with torch.no_grad():
        maps = model._layer_features(images, evaluation=True)
        fast = model.embedder.embed_layer_features(maps)[0]
        stepwise = model.embedder.embed_layer_features_stepwise(maps)[0]
    same = torch.equal(fast.view(torch.int32), stepwise.view(torch.int32))
    scores, anomaly_maps = model._predict(images)
    fns = phase_functions(model, images)
    scores_s, maps_s = fns["predict (step-by-step embedding)"]()
    same &= np.array_equal(np.asarray(scores), np.asarray(scores_s))
    same &= all(np.array_equal(a.view(np.int32), b.view(np.int32)) for a, b in zip(anomaly_maps, maps_s))
    return bool(same)


def fused_differences(model: glass.GLASS, images: torch.Tensor) -> tuple:
    """Largest differences of image scores and anomaly maps between ``--fuse_head`` and the exact path."""
    scores, anomaly_maps = model._predict(images)
    fused_scores, fused_maps = fused_predict(model, images)
    return (float(np.abs(np.asarray(fused_scores) - np.asarray(scores)).max()),
            float(np.abs(np.stack(fused_maps) - np.stack(anomaly_maps)).max()))


def measure(model: glass.GLASS, images: torch.Tensor, batch: int, repeats: int) -> Dict[str, float]:
    """Median ms per image of every phase over ``repeats`` passes over ``images`` in batches of ``batch``
    (``images`` on the model's device)."""
    chunks = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    functions = [phase_functions(model, chunk) for chunk in chunks]
    for fns in functions[:1]:  # warm-up
        for fn in fns.values():
            fn()
    synchronize(model.device)
    totals: Dict[str, List[float]] = {phase: [] for phase in PHASES}
    for rep in range(repeats):
        spent = dict.fromkeys(PHASES, 0.0)
        for k, fns in enumerate(functions):
            shift = (rep + k) % len(PHASES)
            for phase in PHASES[shift:] + PHASES[:shift]:  # a rotating order
                start = time.perf_counter()
                fns[phase]()
                synchronize(model.device)
                spent[phase] += time.perf_counter() - start
        for phase in PHASES:
            totals[phase].append(spent[phase] * 1e3 / (len(chunks) * batch))
    return {phase: statistics.median(values) for phase, values in totals.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--class_dir", help="a trained class folder (config.json + ckpt_best_*.pth) instead of a profile")
    parser.add_argument("--data", default=DATA_DEFAULT, help="the shared data folder (mvtec3d/ inside)")
    parser.add_argument("--images", type=int_range(1), default=None, help="tire test images to time (profile default)")
    parser.add_argument("--batches", type=int_range(1), nargs="+", default=[8, 1], help="batch sizes")
    parser.add_argument("--repeats", type=int_range(1), default=None, help="passes over the images (median; profile default)")
    parser.add_argument("--threads", type=int_range(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu", help="where it runs (auto: CUDA, else MPS, else CPU)")
    parser.add_argument("--onednn", action="store_true",
                        help="build the profile's model with --onednn (a --class_dir keeps its own setting)")
    args = parser.parse_args(argv)
    device = bench_device(args.device)
    logging.basicConfig(level=logging.WARNING)
    utils.keep_freed_memory()  # as main.py does (both sides of every ratio run with it)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = dict(PROFILES[args.profile])
    try:
        if args.class_dir:
            model, config = glass.load_trained(args.class_dir, device)
            profile.update(imagesize=config["input_shape"][-1])
            what = f"trained {args.class_dir} ({config['backbone']} {'+'.join(config['layers_to_extract_from'])}, " \
                   f"{config['net']['target_embed_dimension']}-d, {config['input_shape'][-1]} px)"
        else:
            model = build(profile, device, args.onednn)
            what = (f"{profile['backbone']} {'+'.join(profile['layers'])}, {profile['dim']}-d, dsc_hidden {profile['dsc_hidden']}, "
                    f"{profile['imagesize']} px, untrained heads, backbone with {model.bench_weights}"
                    f"{', --onednn' if model.onednn else ''}")
        images = tire_images(args.data, profile["imagesize"], args.images or profile["images"]).to(device)
    except GlassError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    repeats = args.repeats or profile["repeats"]
    print(f"Machine: {describe_machine(torch.get_num_threads(), device=device)}")
    print(f"Model: {what}")
    identical = same_outputs(model, images[:max(args.batches)])
    print(f"Fast embedding == step-by-step embedding, bit for bit (embeddings, scores, maps): {identical}")
    print("--fuse_head against the exact path: largest difference of image scores %.1e, of anomaly maps %.1e"
          % fused_differences(model, images[:max(args.batches)]))
    results = {batch: measure(model, images, batch, repeats) for batch in args.batches}
    print(f"{len(images)} tire test images, median of {repeats} interleaved passes; ms per image "
          f"(share of predict; ratio to the backbone):")
    header = f"{'phase':34s}" + "".join(f"{f'batch {b}':>26s}" for b in args.batches)
    print(header)
    for phase in PHASES:
        cells = []
        for batch in args.batches:
            value, res = results[batch][phase], results[batch]
            cells.append(f"{value:9.2f} ({100 * value / res['predict']:4.0f}%; {value / res['backbone']:5.2f}x)")
        print(f"{phase:34s}" + "".join(f"{c:>26s}" for c in cells))
    for batch in args.batches:
        res = results[batch]
        rest = res["predict"] - res["backbone"] - res["embedding"] - res["projection + discriminator"] \
            - res["upsample"] - res["smoothing"]
        print(f"batch {batch}: predict / backbone {res['predict'] / res['backbone']:.2f}x "
              f"(step-by-step embedding: {res['predict (step-by-step embedding)'] / res['backbone']:.2f}x; "
              f"--fuse_head: {res['predict, --fuse_head'] / res['backbone']:.2f}x); "
              f"embedding fast / step by step {res['embedding'] / res['embedding, step by step']:.2f}x; "
              f"unaccounted {rest:.2f} ms/image")
    print(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

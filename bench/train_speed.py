"""Training speed and memory: this implementation against the reference's data flow, side by side.

Both flows train the same model on the same data with the same options; only the data flow differs.

* ``this``: the trainer as it is (``--cache auto``): backbone features of the training and test images
  computed once and cached, the centre from a synthesis-free pass over the cached training features,
  evaluation from the cached test features, heatmaps only when the best checkpoint is tested, GAS ascent
  steps and final pass through ``glass.FrozenTrueHalf`` (backward by hand), freed memory kept for reuse
  (``utils.keep_freed_memory``), the training images decoded and resized once (``preload_images``), and at
  one torch thread the synthesised images embedded by the DataLoader workers (``glass.EmbeddingCollate``).
* ``reference``: :class:`ReferenceFlowGLASS`, the trainer with the reference's data flow put back
  (spec "Training", "Metrics", "Known oddities"): no cache; the centre computed every epoch by running
  the shuffled training loader, anomaly synthesis included, and the backbone on its images; every
  evaluation a full pass of the test images through the backbone, every image kept in memory, and a
  heatmap PNG written for every test image; every GAS pass a full discriminator pass over the true
  and synthetic features (no ``glass.FrozenTrueHalf``); pixel AUROC by scikit-learn's ``roc_auc_score`` (the same
  bits as ``metrics.roc_auc``, more slowly); PRO at the final test by a loop over the 200 thresholds
  (each binarised, dilated, its ground-truth regions labelled and measured, as the reference does);
  glibc's default malloc settings; every training image decoded and resized at every epoch.

Each flow runs in its own child process (so that its peak memory is its own): it trains ``--epochs``
epochs with an evaluation after every epoch, then tests the best checkpoint. The two children take
turns phase by phase: each stops at a gate before its cache/setup phase, before every epoch and before
the final test, and the driver lets one phase of one child run at a time, alternating which flow goes
first (this, reference / reference, this / ...). So both flows see the machine's load of the same
minutes, and the figures are medians over epochs (and ``--repeats`` pairs of runs). Peak memory is each
child's resident-set high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``; psutil is not
installed), the DataLoader workers' (the largest one, ``RUSAGE_CHILDREN``) reported apart; on a GPU
(``--device cuda``) also the most memory torch's allocator held on it (``torch.cuda.max_memory_allocated``).

    python bench/train_speed.py                       # CPU calibration profile on the real tire class (~7 min on 2 idle cores)
    python bench/train_speed.py --profile tiny        # the tests' tiny profile: a quick check (under a minute)
    python bench/train_speed.py --limit 96 --epochs 3 --repeats 2   # shorter epochs, more of them
    python bench/train_speed.py --device cuda --threads 0             # on a GPU
    python bench/train_speed.py --onednn                             # this flow with --onednn (other last bits)

By default torch runs one thread (``--threads 1``; ``--threads 0`` keeps torch's default): the two
DataLoader workers take the other core, and on a shared machine two torch threads were slower than one
(each parallel operation waits for a descheduled thread).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench.machine import (DEVICE_CHOICES, MAX_SEED, bench_device, describe_machine, int_range,  # noqa: E402
                           peak_device_memory_mb, peak_rss_mb, reset_peak_device_memory)

DATA_DEFAULT = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")

# The CPU calibration profile (bench/calibrate.sh): EfficientNet-Lite0 blocks.2 + blocks.4, 512-d, 128 px.
PROFILES: Dict[str, Dict[str, object]] = {
    "cpu": dict(backbone="efficientnet_lite0", layers=["blocks.2", "blocks.4"], pretrain_embed_dimension=512,
                target_embed_dimension=512, dsc_hidden=512, step=20, limit=392, imagesize=128, epochs=2, repeats=2),
    "tiny": dict(backbone="efficientnet_lite0", layers=["blocks.2", "blocks.4"], pretrain_embed_dimension=128,
                 target_embed_dimension=128, dsc_hidden=128, step=3, limit=16, imagesize=64, epochs=3, repeats=1),
}
FLOWS = ("this", "reference")
FLOW_RUNS = {"this": "this implementation's run", "reference": "the reference flow's run"}  # for messages


# --------------------------------------------------------------------------------------------------
# The reference's PRO: one threshold at a time.

def loop_pro(masks, amaps, num_th: int = 200) -> float:
    """PRO as the reference computes it: for each of the thresholds, binarise every map, dilate it with a
    5x5 rectangle, label the ground-truth regions of every mask and take the share of each region the
    dilated map covers; the FPR on the undilated maps; area up to FPR 0.3 with the FPR min-max normalised."""
    import cv2
    import numpy as np
    from skimage import measure
    from sklearn import metrics as skm

    masks = np.asarray(masks)
    amaps = np.asarray(amaps)
    low, high = amaps.min(), amaps.max()
    kernel = np.ones((5, 5), dtype=np.uint8)
    normal = 1 - masks
    pros, fprs = [], []
    for threshold in np.arange(low, high, (high - low) / num_th):
        binary = np.zeros(amaps.shape, dtype=np.uint8)
        binary[amaps > threshold] = 1
        shares = []
        for image_binary, mask in zip(binary, masks):
            dilated = cv2.dilate(image_binary, kernel)
            for region in measure.regionprops(measure.label(mask)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                shares.append(dilated[rows, cols].sum() / region.area)
        pros.append(np.mean(shares))
        fprs.append(np.logical_and(normal, binary).sum() / normal.sum())
    pros, fprs = np.asarray(pros), np.asarray(fprs)
    keep = fprs < 0.3
    fprs, pros = fprs[keep], pros[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min() + 1e-10)
    return float(skm.auc(fprs, pros))


def sklearn_roc_auc(labels, scores) -> float:
    """ROC AUC as the reference computes it: scikit-learn's roc_auc_score (a stable argsort of all scores)."""
    from sklearn import metrics as skm

    return float(skm.roc_auc_score(labels, scores))


# --------------------------------------------------------------------------------------------------
# The two flows (built in the child process, where glass is imported).

def flow_classes():
    import torch

    import glass
    import metrics

    class TimedGLASS(glass.GLASS):
        """The trainer as it is, with clocks: epoch starts, centre passes, evaluations, cache building."""

        def _bench_reset(self) -> None:
            self.bench = {"epoch_starts": [], "center_s": [], "predict_s": [], "evaluate_s": [], "cache_s": 0.0,
                          "cache_bytes": 0}

        def setup_feature_caches(self, center_data, val_data, training_data=None) -> None:
            start = time.perf_counter()
            super().setup_feature_caches(center_data, val_data, training_data)
            self.bench["cache_s"] = time.perf_counter() - start
            for cache in (self.train_cache, self.test_cache):
                rows = getattr(getattr(cache, "store", None), "rows", None)
                if rows is not None:
                    self.bench["cache_bytes"] += int(rows.nbytes) if hasattr(rows, "nbytes") else rows.numel() * rows.element_size()

        def _compute_center(self, training_data) -> None:
            start = gate("epoch")
            self.bench["epoch_starts"].append(start)
            super()._compute_center(training_data)
            self.bench["center_s"].append(time.perf_counter() - start)

        def predict(self, dataloader, keep_images: bool = True):
            start = time.perf_counter()
            out = super().predict(dataloader, keep_images=keep_images)
            self.bench["predict_s"].append(time.perf_counter() - start)
            return out

        def _evaluate(self, scores, segmentations, labels_gt, masks_gt, path: str = "training"):
            start = time.perf_counter()
            out = super()._evaluate(scores, segmentations, labels_gt, masks_gt, path=path)
            self.bench["evaluate_s"].append(time.perf_counter() - start)
            return out

    class ReferenceFlowGLASS(TimedGLASS):
        """The reference's data flow on the same model (see the module docstring)."""

        reuse_true_half = False  # every GAS ascent step runs the discriminator over both halves

        def setup_feature_caches(self, center_data, val_data, training_data=None) -> None:
            self.close_feature_caches()  # the reference has no cache
            self.bench["cache_s"] = 0.0

        def _center_loader(self, training_data):
            return training_data  # the shuffled training loader, anomaly synthesis included

        def _synthesis_loader(self, training_data):
            return training_data  # the main process embeds the synthesised images

        def _preload_training_images(self, training_data, epochs: int) -> None:
            pass  # the workers decode and resize every image and texture at every draw

        def _compute_center(self, training_data) -> None:
            """Run the whole training loader; per batch, the mean projected feature of its images, position
            by position; the centre is the mean over the batches (random generators not isolated)."""
            start = gate("epoch")
            self.bench["epoch_starts"].append(start)
            self.embedder.eval()
            total, count = None, 0
            with torch.no_grad():
                for batch in training_data:
                    images = batch["image"].to(torch.float).to(self.device)
                    features = self._project(self._embed(images)[0])
                    batch_mean = features.reshape(images.shape[0], -1, features.shape[-1]).mean(dim=0)
                    total = batch_mean if total is None else total + batch_mean
                    count += 1
            self.center = total / count
            self.bench["center_s"].append(time.perf_counter() - start)

        def _train(self, training_data, val_data, name: str):
            self._bench_name = name
            return super()._train(training_data, val_data, name)

        def predict(self, dataloader, keep_images: bool = True):
            out = super().predict(dataloader, keep_images=True)  # every test image collected
            self._bench_images = out[0]
            return out

        def _evaluate(self, scores, segmentations, labels_gt, masks_gt, path: str = "training"):
            start = time.perf_counter()
            with swapped(metrics, "compute_pro", loop_pro), swapped(metrics, "roc_auc", sklearn_roc_auc):
                out = glass.GLASS._evaluate(self, scores, segmentations, labels_gt, masks_gt, path=path)
            if path == "training":  # a heatmap PNG per test image at every evaluation (the test writes its own)
                self._write_heatmaps(self._bench_images, segmentations, masks_gt, self._bench_name, "training")
            self.bench["evaluate_s"].append(time.perf_counter() - start)
            return out

    return {"this": TimedGLASS, "reference": ReferenceFlowGLASS}


# Turn-taking between the driver and a child: the child writes GATE on the protocol stream (its real
# stdout; everything else it prints goes to stderr) and waits for a line on stdin before it goes on.
_PROTOCOL = None
_GATE_ARRIVALS: List[float] = []


def gate(phase: str) -> float:
    """Stop until the driver says go (no-op outside the driver); returns the time the phase starts."""
    _GATE_ARRIVALS.append(time.perf_counter())
    if _PROTOCOL is not None:
        _PROTOCOL.write(f"GATE {phase}\n")
        _PROTOCOL.flush()
        if not sys.stdin.readline():
            sys.exit("train_speed: the driver went away")
    return time.perf_counter()


@contextlib.contextmanager
def swapped(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# --------------------------------------------------------------------------------------------------
# One run (child process)

def run_flow(args) -> Dict[str, object]:
    """Train ``args.epochs`` epochs with the flow ``args.child`` and test the best checkpoint; the clocks."""
    import torch

    import main
    import utils
    from datasets.mvtec import DatasetSplit, MVTecDataset

    if args.child == "this":  # as main.py does; the reference runs with glibc's defaults
        utils.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    profile = PROFILES[args.profile]
    size = int(profile["imagesize"])
    device = bench_device(args.device)
    data_root = os.path.join(args.data, "mvtec3d")
    textures = os.path.join(args.data, "dtd", "images")
    num_workers = main.default_num_workers() if args.num_workers is None else args.num_workers
    utils.fix_seeds(args.seed)

    common = dict(classname="tire", resize=size, imagesize=size)
    test_set = MVTecDataset(data_root, textures, dataset_name="mvtec", split=DatasetSplit.TEST, **common)
    train_set = MVTecDataset(data_root, textures, dataset_name="mvtec", split=DatasetSplit.TRAIN, distribution=2,
                             mean=0.5, std=0.1, fg=0, rand_aug=1, downsampling=8, **common)
    test_loader = main.make_loader(test_set, args.batch_size, num_workers, shuffle=False)
    train_loader = main.make_loader(train_set, args.batch_size, num_workers, shuffle=True)

    import backbones

    backbone = backbones.load(str(profile["backbone"]))
    backbone.name, backbone.seed = profile["backbone"], None
    model = flow_classes()[args.child](device)
    model._bench_reset()
    model.load(
        backbone=backbone, layers_to_extract_from=list(profile["layers"]), device=device, input_shape=(3, size, size),
        pretrain_embed_dimension=profile["pretrain_embed_dimension"],
        target_embed_dimension=profile["target_embed_dimension"], patchsize=3, meta_epochs=args.epochs, eval_epochs=1,
        dsc_layers=2, dsc_hidden=profile["dsc_hidden"], pre_proj=1, mining=1, noise=0.015, radius=0.75, p=0.5,
        lr=0.0001, step=profile["step"], limit=args.limit if args.limit is not None else profile["limit"],
        cache="auto" if args.child == "this" else "off",
        onednn=args.onednn and args.child == "this",
    )
    name = "mvtec_tire"
    with tempfile.TemporaryDirectory(prefix="train_speed_") as results:
        model.set_model_dir(utils.models_dir(results, 0), name, results_path=results)
        start = gate("setup")
        reset_peak_device_memory(device)
        usage_start = resource.getrusage(resource.RUSAGE_SELF)
        best = model.trainer(train_loader, test_loader, name)
        usage_end = resource.getrusage(resource.RUSAGE_SELF)
        test_start = gate("test")
        n_eval_predicts = len(model.bench["predict_s"])
        result = model.tester(test_loader, name)
        test_end = time.perf_counter()
        model.close()
        heatmaps = sum(len(files) for _, _, files in os.walk(os.path.join(results, "training")))

    bench = model.bench
    # An epoch runs from its gate's go to the next gate's arrival (the wait at a gate is not counted).
    arrivals = _GATE_ARRIVALS[2:]  # after the setup gate and the first epoch gate
    epochs = [end - begin for begin, end in zip(bench["epoch_starts"], arrivals)]
    setup_s = _GATE_ARRIVALS[1] - start
    evals = [p + e for p, e in zip(bench["predict_s"][:n_eval_predicts], bench["evaluate_s"][:n_eval_predicts])]
    return {
        "flow": args.child,
        "epochs": epochs,
        "setup_s": setup_s,  # cache building and checks before the first epoch
        "cache_s": bench["cache_s"],
        "cache_mb": bench["cache_bytes"] / 2**20,
        "center_s": bench["center_s"],
        "eval_s": evals,
        "eval_predict_s": bench["predict_s"][:n_eval_predicts],
        "eval_metrics_s": bench["evaluate_s"][:n_eval_predicts],
        "train_total_s": setup_s + sum(epochs),
        # Page faults and kernel time of training (setup included), per epoch: what fresh memory costs.
        "faults_per_epoch": (usage_end.ru_minflt - usage_start.ru_minflt) / args.epochs,
        "system_s_per_epoch": (usage_end.ru_stime - usage_start.ru_stime) / args.epochs,
        "test_s": test_end - test_start,
        "test_pro_s": bench["evaluate_s"][-1],
        "best_record": [float(v) for v in best] if best else None,
        "test_result": [float(v) for v in result],
        "training_heatmaps": heatmaps,
        "peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
        "peak_worker_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
        "peak_device_mb": peak_device_memory_mb(device),  # NaN on the CPU
        "device": str(device),
        "threads": torch.get_num_threads(),
        "num_workers": num_workers,
        "train_images": len(train_set),
        "test_images": len(test_set),
    }


# --------------------------------------------------------------------------------------------------
# The driver (parent process)

def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def child_command(args, flow: str, out: str) -> List[str]:
    command = [sys.executable, os.path.abspath(__file__), "--child", flow, "--json", out, "--profile", args.profile,
               "--data", args.data, "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
               "--seed", str(args.seed), "--threads", str(args.threads), "--device", args.device]
    if args.onednn:
        command.append("--onednn")
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    if args.num_workers is not None:
        command += ["--num_workers", str(args.num_workers)]
    return command


def report(runs: Dict[str, List[dict]]) -> str:
    """Medians per flow and the ratios this / reference."""
    def per_flow(key, pick):
        return {flow: median([v for run in runs[flow] for v in pick(run[key])]) for flow in FLOWS}

    rows = [
        ("epoch incl. evaluation, all epochs (s)", per_flow("epochs", lambda v: v)),
        ("epoch incl. evaluation, after the first (s)", per_flow("epochs", lambda v: v[1:] or v)),
        ("centre pass (s)", per_flow("center_s", lambda v: v)),
        ("evaluation pass: predict + metrics (+ heatmaps) (s)", per_flow("eval_s", lambda v: v)),
        ("  of which predict (s)", per_flow("eval_predict_s", lambda v: v)),
        ("  of which metrics (+ heatmap PNGs) (s)", per_flow("eval_metrics_s", lambda v: v)),
        ("setup before the first epoch (cache) (s)", per_flow("setup_s", lambda v: [v])),
        ("training, setup included (s)", per_flow("train_total_s", lambda v: [v])),
        ("final test of the best checkpoint (s)", per_flow("test_s", lambda v: [v])),
        ("  of which metrics incl. PRO (s)", per_flow("test_pro_s", lambda v: [v])),
        ("training: minor page faults per epoch", per_flow("faults_per_epoch", lambda v: [v])),
        ("training: system CPU time per epoch (s)", per_flow("system_s_per_epoch", lambda v: [v])),
        ("peak RSS, main process (MB)", per_flow("peak_rss_mb", lambda v: [v])),
        ("peak RSS, largest DataLoader worker (MB)", per_flow("peak_worker_rss_mb", lambda v: [v])),
        ("feature cache size (MB)", per_flow("cache_mb", lambda v: [v])),
    ]
    if any(math.isfinite(run.get("peak_device_mb", math.nan)) for flow in FLOWS for run in runs[flow]):
        rows.insert(-2, ("peak GPU memory allocated (MB)", per_flow("peak_device_mb", lambda v: [v])))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  {'this':>10}  {'reference':>10}  {'ratio':>7}"]
    for label, values in rows:
        this, ref = values["this"], values["reference"]
        ratio = f"{this / ref:.3f}" if ref and ref == ref and ref > 0 else "-"
        lines.append(f"{label:{width}}  {this:10.2f}  {ref:10.2f}  {ratio:>7}")
    return "\n".join(lines)


def run_pair(args, tmp: str, index: int) -> Dict[str, dict]:
    """Start one child per flow and let them run phase by phase in turns; their figures by flow."""
    env = {**os.environ, "TQDM_DISABLE": "1"}  # no progress bars from the children
    children, outputs = {}, {}
    for flow in FLOWS:
        outputs[flow] = os.path.join(tmp, f"{flow}_{index}.json")
        child = subprocess.Popen(child_command(args, flow, outputs[flow]), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
        children[flow] = child
        if not child.stdout.readline():  # built its model and waits at its first gate
            raise SystemExit(f"train_speed: {FLOW_RUNS[flow]} failed before training (exit code {child.wait()})")
    order = list(FLOWS) if index % 2 == 0 else list(FLOWS)[::-1]
    alive = set(FLOWS)
    while alive:
        for flow in list(order):
            if flow not in alive:
                continue
            child = children[flow]
            child.stdin.write("go\n")
            child.stdin.flush()
            if not child.stdout.readline():  # it finished (or failed) instead of reaching its next gate
                code = child.wait()
                if code != 0:
                    for other in children.values():
                        other.kill()
                    raise SystemExit(f"train_speed: {FLOW_RUNS[flow]} failed (exit code {code})")
                alive.discard(flow)
        order.reverse()
    figures = {}
    for flow in FLOWS:
        with open(outputs[flow]) as handle:
            figures[flow] = json.load(handle)
    return figures


def path_problem(args) -> Optional[str]:
    """What is wrong with ``--data`` or ``--json`` (checked before any child starts, so that a mistake costs no
    run and no figures are lost at the end), or None."""
    for folder in (os.path.join(args.data, "mvtec3d", "tire"), os.path.join(args.data, "dtd", "images")):
        if not os.path.isdir(folder):
            return (f"--data {args.data}: no folder {folder}: give the shared data folder (mvtec3d/tire and "
                    "dtd/images inside)")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            return f"--json {args.json} is a folder: give a file path such as {os.path.join(args.json, 'raw.json')}"
        if not os.path.isdir(folder):
            return f"--json {args.json}: the folder {folder} does not exist: create it or choose another path"
        if not os.access(args.json if os.path.exists(args.json) else folder, os.W_OK):
            return f"--json {args.json}: cannot write there (permissions): choose another path"
    return None


def main_driver(args) -> int:
    problem = path_problem(args)
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        return 2
    profile = PROFILES[args.profile]
    args.epochs = args.epochs or int(profile["epochs"])
    repeats = args.repeats or int(profile["repeats"])
    import torch

    device = bench_device(args.device)  # a device this machine lacks stops here, before the children start
    print(f"Machine: {describe_machine(args.threads or torch.get_num_threads(), device=device)}")
    print(f"Profile {args.profile}: {profile['backbone']} {'+'.join(profile['layers'])}, "
          f"{profile['pretrain_embed_dimension']}/{profile['target_embed_dimension']}-d, dsc_hidden {profile['dsc_hidden']}, "
          f"{profile['imagesize']} px, step {profile['step']}, limit {args.limit or profile['limit']}, batch {args.batch_size}, "
          f"{args.epochs} epochs with an evaluation each; {repeats} pair(s) of runs, phases taking turns"
          f"{'; this flow with --onednn (other last bits)' if args.onednn else ''}", flush=True)
    runs: Dict[str, List[dict]] = {flow: [] for flow in FLOWS}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        for i in range(repeats):
            pair = run_pair(args, tmp, i)
            for flow in FLOWS:
                run = pair[flow]
                runs[flow].append(run)
                print(f"  pair {i + 1} {flow:9s}: setup {run['setup_s']:.1f} s, epochs "
                      f"{', '.join(f'{e:.1f}' for e in run['epochs'])} s, evaluations "
                      f"{', '.join(f'{e:.2f}' for e in run['eval_s'])} s, test {run['test_s']:.1f} s, "
                      f"peak RSS {run['peak_rss_mb']:.0f} MB; test metrics "
                      f"{', '.join(f'{v:.3f}' for v in run['test_result'][:5])}", flush=True)
    first = runs["this"][0]
    print(f"\n{first['train_images']} training and {first['test_images']} test images of MVTec 3D-AD tire; "
          f"{first['threads']} torch thread(s), {first['num_workers']} DataLoader worker(s); "
          f"{time.perf_counter() - started:.0f} s in all; medians over runs (and epochs); ratio = this / reference:")
    print(report(runs))
    print(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(runs, handle, indent=1)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--data", default=DATA_DEFAULT, help="the shared data folder (mvtec3d/ and dtd/images/ inside)")
    parser.add_argument("--epochs", type=int_range(1), default=None, help="epochs per run (profile default)")
    parser.add_argument("--repeats", type=int_range(1), default=None, help="runs per flow (profile default)")
    parser.add_argument("--limit", type=int_range(1), default=None, help="training samples per epoch (profile default; cpu 392)")
    parser.add_argument("--batch_size", type=int_range(1), default=8)
    parser.add_argument("--threads", type=int_range(0), default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--num_workers", type=int_range(0), default=None, help="DataLoader workers (default: main.default_num_workers())")
    parser.add_argument("--seed", type=int_range(0, MAX_SEED), default=0)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu", help="where both flows train (auto: CUDA, else MPS, else CPU)")
    parser.add_argument("--onednn", action="store_true",
                        help="run this flow with --onednn (its Linear layers through oneDNN; other last bits)")
    parser.add_argument("--json", default=None, help="write the raw figures here")
    parser.add_argument("--child", choices=FLOWS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child:
        # The protocol stream is the real stdout; whatever else the child prints goes to stderr.
        _PROTOCOL = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        arguments.epochs = arguments.epochs or int(PROFILES[arguments.profile]["epochs"])
        from utils import GlassError

        try:
            figures = run_flow(arguments)
        except GlassError as exc:  # a mistake in the data (its layout, say): one line, as main.py
            print(f"Error: {exc}", file=sys.stderr)
            sys.exit(2)
        with open(arguments.json, "w") as handle:
            json.dump(figures, handle)
        sys.exit(0)
    sys.exit(main_driver(arguments))

"""glibc's malloc as main.py sets it (``utils.keep_freed_memory``) against glibc's defaults, side by side.

Two child processes run the same training steps and the same batch-8 predictions: one with freed memory
kept for reuse (every block from the heap, the heap never trimmed), one with glibc's defaults
(``GLASS_MALLOC=system``). With the defaults, blocks above glibc's mmap threshold (32 MiB at most) are mapped
on their own and unmapped when freed, so every call page-faults and zero-fills them again: at 288 px one
batch of EfficientNet-Lite0 maps takes 64 MB. Both children give the same bits (the script checks the
predicted scores and exits with 1 if they differ).

Each child trains on MVTec 3D-AD tire (its first ``--steps`` steps; the first one, which builds what later
steps reuse, is left out of the median), then times ``GLASS._predict`` on 8 test images. Reported per
child: median step time and page faults per step, predict ms per image and page faults per call, peak
resident memory (``ru_maxrss``). The children run one after the other, alternating which goes first over
``--repeats`` pairs.

    python bench/malloc_speed.py                                   # 288 px, 1536-d, dsc_hidden 1024 (~5 min on 2 cores)
    python bench/malloc_speed.py --imagesize 128 --dim 512 --dsc_hidden 512   # the CPU calibration profile
"""
from __future__ import annotations

import argparse
import json
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

from bench.machine import describe_machine, int_range, peak_rss_mb  # noqa: E402

DATA_DEFAULT = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
SETTINGS = ("kept", "system")  # utils.keep_freed_memory as main.py calls it; glibc's defaults


class _StepsDone(Exception):
    """Raised from the timed training step once enough steps ran."""


def faults() -> int:
    """This process's minor page faults so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_child(args) -> Dict[str, object]:
    """Train ``args.steps`` steps and time batch-8 predictions in this process, with its malloc setting."""
    import numpy as np
    import torch

    import backbones
    import glass
    import main
    import utils
    from datasets.mvtec import DatasetSplit, MVTecDataset

    kept = utils.keep_freed_memory()  # False under GLASS_MALLOC=system (the parent sets it)
    if args.threads:
        torch.set_num_threads(args.threads)
    utils.fix_seeds(0)
    size = args.imagesize
    data_root, textures = os.path.join(args.data, "mvtec3d"), os.path.join(args.data, "dtd", "images")
    common = dict(classname="tire", resize=size, imagesize=size)
    train_set = MVTecDataset(data_root, textures, dataset_name="mvtec", split=DatasetSplit.TRAIN, distribution=2,
                             mean=0.5, std=0.1, fg=0, rand_aug=1, downsampling=8, **common)
    test_set = MVTecDataset(data_root, textures, dataset_name="mvtec", split=DatasetSplit.TEST, **common)
    workers = main.default_num_workers()
    train_loader = main.make_loader(train_set, 8, workers, shuffle=True)
    test_loader = main.make_loader(test_set, 8, workers, shuffle=False)

    backbone = backbones.load("efficientnet_lite0")
    backbone.name, backbone.seed = "efficientnet_lite0", None
    model = glass.GLASS(torch.device("cpu"))
    model.load(backbone=backbone, layers_to_extract_from=["blocks.2", "blocks.4"], device=torch.device("cpu"),
               input_shape=(3, size, size), pretrain_embed_dimension=args.dim, target_embed_dimension=args.dim,
               patchsize=3, meta_epochs=1, eval_epochs=1, dsc_layers=2, dsc_hidden=args.dsc_hidden, pre_proj=1,
               step=20, limit=8 * args.steps)

    steps: List[tuple] = []
    train_step = model._train_step

    def timed_step(batch):
        start, before = time.perf_counter(), faults()
        result = train_step(batch)
        steps.append((time.perf_counter() - start, faults() - before))
        if len(steps) == args.steps:
            raise _StepsDone
        return result

    model._train_step = timed_step
    with tempfile.TemporaryDirectory(prefix="malloc_speed_") as results:
        model.set_model_dir(utils.models_dir(results, 0), "mvtec_tire", results_path=results)
        try:
            model.trainer(train_loader, test_loader, "mvtec_tire")
        except _StepsDone:
            pass
        model.close()

    images = torch.stack([test_set[i]["image"] for i in range(8)])
    scores = model._predict(images)[0]  # warm-up
    predicts = []
    for _ in range(args.predicts):
        start, before = time.perf_counter(), faults()
        model._predict(images)
        predicts.append((time.perf_counter() - start, faults() - before))
    later = steps[1:] or steps
    return {
        "kept": kept,
        "step_s": statistics.median(s for s, _ in later),
        "step_faults": statistics.median(f for _, f in later),
        "predict_ms_per_image": statistics.median(s for s, _ in predicts) * 1e3 / len(images),
        "predict_faults": statistics.median(f for _, f in predicts),
        "peak_rss_mb": peak_rss_mb(),
        "scores": np.asarray(scores, dtype=np.float64).tolist(),
    }


def run_pair(args, order: Sequence[str]) -> Dict[str, dict]:
    """One child per setting, in ``order``; their results by setting."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in order:
            out = os.path.join(tmp, f"{setting}.json")
            env = {key: value for key, value in os.environ.items() if key != "GLASS_MALLOC"}
            if setting == "system":
                env["GLASS_MALLOC"] = "system"
            command = [sys.executable, os.path.abspath(__file__), "--child", out, "--data", args.data,
                       "--imagesize", str(args.imagesize), "--dim", str(args.dim), "--dsc_hidden", str(args.dsc_hidden),
                       "--steps", str(args.steps), "--predicts", str(args.predicts), "--threads", str(args.threads)]
            done = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the {setting} child failed:\n{done.stderr[-3000:]}")
            with open(out) as handle:
                results[setting] = json.load(handle)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA_DEFAULT, help="the shared data folder (mvtec3d/ and dtd/ inside)")
    parser.add_argument("--imagesize", type=int_range(32), default=288, help="image side (resize = imagesize)")
    parser.add_argument("--dim", type=int_range(1), default=1536, help="pretrain and target embedding dimension")
    parser.add_argument("--dsc_hidden", type=int_range(1), default=1024, help="the discriminator's hidden width")
    parser.add_argument("--steps", type=int_range(2), default=4, help="training steps per child (the first is not timed)")
    parser.add_argument("--predicts", type=int_range(1), default=5, help="timed batch-8 predictions per child")
    parser.add_argument("--repeats", type=int_range(1), default=1, help="pairs of children (which goes first alternates)")
    parser.add_argument("--threads", type=int_range(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        with open(args.child, "w") as handle:
            json.dump(run_child(args), handle)
        return 0
    if not os.path.isdir(os.path.join(args.data, "mvtec3d", "tire")):
        print(f"Error: no MVTec 3D-AD tire class under {args.data}/mvtec3d: give --data the shared data folder",
              file=sys.stderr)
        return 2

    runs: Dict[str, List[dict]] = {setting: [] for setting in SETTINGS}
    for index in range(args.repeats):
        order = SETTINGS if index % 2 == 0 else SETTINGS[::-1]
        for setting, result in run_pair(args, order).items():
            runs[setting].append(result)
    kept, system = runs["kept"], runs["system"]
    same = all(k["scores"] == s["scores"] for k, s in zip(kept, system))

    def mid(results: List[dict], key: str) -> float:
        return statistics.median(r[key] for r in results)

    import torch

    print(f"Machine: {describe_machine(args.threads or torch.get_num_threads())}")
    print(f"EfficientNet-Lite0 blocks.2+blocks.4, {args.imagesize} px, {args.dim}-d, dsc_hidden {args.dsc_hidden}, "
          f"batch 8; {args.steps} steps per child, {args.repeats} pair(s); medians")
    print(f"{'':34}{'kept (main.py)':>16}{'glibc defaults':>16}{'ratio':>8}")
    for label, key, fmt in (("training step (s)", "step_s", "{:.2f}"), ("page faults per step", "step_faults", "{:,.0f}"),
                            ("predict, batch 8 (ms per image)", "predict_ms_per_image", "{:.1f}"),
                            ("page faults per predict call", "predict_faults", "{:,.0f}"),
                            ("peak resident memory (MB)", "peak_rss_mb", "{:,.0f}")):
        a, b = mid(kept, key), mid(system, key)
        ratio = f"{a / b:.2f}" if b else "-"
        print(f"{label:34}{fmt.format(a):>16}{fmt.format(b):>16}{ratio:>8}")
    print(f"Same predicted scores with both settings: {same}")
    if not all(r["kept"] for r in kept):
        print("Note: keep_freed_memory did not apply here (not glibc, or glibc's own MALLOC_* settings are set)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

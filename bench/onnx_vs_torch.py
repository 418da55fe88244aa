"""onnxruntime vs PyTorch on the CPU: time per image of the whole inference path at batch 1 and 8.

PyTorch runs ``GLASS._predict`` (network in torch, smoothing with scipy); onnxruntime runs the model
exported by ``onnx/pth2onnx.py`` (everything in one graph). The fused pair compares like with like: PyTorch's
``_predict`` with ``--fuse_head`` (``model.FusedHead``, maps as matrix products) against the graph exported
with ``--fuse_head``; both give other last bits than the exact path. All use the same number of threads.

    python bench/onnx_vs_torch.py                         # EfficientNet-Lite0 at 288 px, untrained heads
    python bench/onnx_vs_torch.py --class_dir results/models/backbone_0/mvtec_tire   # a trained class
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import utils  # noqa: E402
from utils import DeferredModule, GlassError  # noqa: E402
from bench.machine import describe_machine  # noqa: E402
from bench.predict_speed import fused_predict  # noqa: E402

# Imported at first use, so that --help and option mistakes answer without loading torch (seconds).
np = DeferredModule("numpy")
torch = DeferredModule("torch")
glass = DeferredModule("glass")


def load_pth2onnx():
    """onnx/pth2onnx.py as a module (the folder name must not shadow the onnx package)."""
    spec = importlib.util.spec_from_file_location("glass_pth2onnx", os.path.join(REPO_ROOT, "onnx", "pth2onnx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_config(imagesize: int) -> dict:
    """EfficientNet-Lite0 (bundled ImageNet weights), blocks.2 + blocks.4, the CLI's default sizes."""
    return {
        "backbone": "efficientnet_lite0",
        "layers_to_extract_from": ["blocks.2", "blocks.4"],
        "input_shape": [3, imagesize, imagesize],
        "net": {"pretrain_embed_dimension": 1024, "target_embed_dimension": 1024, "patchsize": 3,
                "dsc_layers": 2, "dsc_hidden": 1024, "pre_proj": 1},
        "dataset": {"name": "bench", "classname": "random", "resize_used": imagesize, "imagesize_used": imagesize},
    }


def time_per_image(run: Callable[[], object], batch: int, repeats: int) -> float:
    """Median seconds per image over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / batch)
    return statistics.median(times)


def benchmark(model: glass.GLASS, config: dict, batches: Sequence[int], repeats: int, threads: int) -> List[Dict]:
    """Per batch size: seconds per image for PyTorch and onnxruntime, and their largest score difference."""
    import onnxruntime

    pth2onnx = load_pth2onnx()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = []
        for fused in (False, True):
            path = os.path.join(tmp, f"glass{'_fused' if fused else ''}.onnx")
            pth2onnx.export(model, config, path, checkpoint=getattr(model, "checkpoint_path", ""), check=False,
                            fuse_head=fused)
            sessions.append(onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
        session, fused_session = sessions
        rows = []
        for batch in batches:
            images = torch.randn(batch, *config["input_shape"], generator=torch.Generator().manual_seed(batch))
            feed = {"image": images.numpy()}
            torch_s = time_per_image(lambda: model._predict(images), batch, repeats)
            torch_fused_s = time_per_image(lambda: fused_predict(model, images), batch, repeats)
            ort_s = time_per_image(lambda: session.run(None, feed), batch, repeats)
            fused_s = time_per_image(lambda: fused_session.run(None, feed), batch, repeats)
            reference = np.asarray(model._predict(images)[0])
            diff = float(np.abs(session.run(None, feed)[0] - reference).max())
            fused_diff = float(np.abs(fused_session.run(None, feed)[0] - reference).max())
            rows.append({"batch": batch, "torch_ms": torch_s * 1e3, "ort_ms": ort_s * 1e3, "max_abs_score": diff,
                         "torch_fused_ms": torch_fused_s * 1e3, "fused_ort_ms": fused_s * 1e3,
                         "fused_max_abs_score": fused_diff})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    positive_int = load_pth2onnx().positive_int
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--class_dir", help="trained class folder (config.json + ckpt_best_*.pth); default: an untrained EfficientNet-Lite0 model")
    parser.add_argument("--imagesize", type=positive_int, default=288, help="input side of the on-the-fly model (ignored with --class_dir)")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8], help="batch sizes to time")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per batch size (median reported)")
    parser.add_argument("--threads", type=positive_int, default=utils.usable_cores(), help="threads for both PyTorch and onnxruntime")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    utils.keep_freed_memory()  # as main.py does
    try:
        if args.class_dir:
            model, config = glass.load_trained(args.class_dir)
            what = f"trained {args.class_dir} ({config['backbone']}, {config['input_shape'][-1]} px)"
        else:
            torch.manual_seed(0)
            config = demo_config(args.imagesize)
            model = glass.build_model(config)
            what = f"efficientnet_lite0 blocks.2+blocks.4, 1024-d, untrained heads, {args.imagesize} px"
        rows = benchmark(model, config, args.batches, args.repeats, args.threads)
    except GlassError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    import onnxruntime

    print(f"Machine: {describe_machine(args.threads, extra=f'onnxruntime {onnxruntime.__version__}')}")
    print(f"Model: {what}; {args.threads} thread(s); median of {args.repeats} runs")
    print("ms per image; speed-up = PyTorch / onnxruntime on the same path; score differences from PyTorch's exact path")
    print(f"{'':>5}  {'exact path':^58}  {'--fuse_head':^58}")
    header = f"{'PyTorch':>9}  {'onnxruntime':>11}  {'speed-up':>8}  {'max |score diff|':>16}"
    print(f"{'batch':>5}  {header}    {header}")
    for row in rows:
        print(f"{row['batch']:>5}  {row['torch_ms']:>9.1f}  {row['ort_ms']:>11.1f}  {row['torch_ms'] / row['ort_ms']:>7.2f}x"
              f"  {row['max_abs_score']:>16.1e}    {row['torch_fused_ms']:>9.1f}  {row['fused_ort_ms']:>11.1f}"
              f"  {row['torch_fused_ms'] / row['fused_ort_ms']:>7.2f}x  {row['fused_max_abs_score']:>16.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One gradient-ascent pass of global anomaly synthesis: the reference's plain pass against glass.FrozenTrueHalf.

An ascent pass scores the true and the synthetic features together (the discriminator's BatchNorm sees
both halves) and takes the gradient of the synthetic half's loss with respect to the synthetic features
(spec "One training step"). Timed side by side, on the shapes of a training step:

* ``plain``: ``discriminator(cat([true, synthetic]))`` and its gradient, as the reference runs every pass;
* ``frozen, autograd``: ``glass.FrozenTrueHalf``, the first Linear layer's output of the true half
  computed once per training step (not timed here), the rest of the pass and its gradient by autograd
  (as the trainer runs the ascent passes on other devices and discriminators);
* ``frozen, by hand``: the same with the backward pass written out (``FrozenTrueHalf.gradient`` as the
  trainer runs it on the CPU for a discriminator with one hidden block);
* ``frozen, by hand, oneDNN``: the same with its two matrix products through oneDNN (``--onednn``:
  AVX-512 kernels where MKL has none, other last bits; reported as its largest difference from the plain
  pass's gradient);
* ``floor``: the first Linear layer over the synthetic half alone, forward and backward to its input:
  the two matrix products that a pass cannot do without (through torch.addmm/mm, as the plain pass runs them).

The script checks with ``glass.ascent_pass_is_exact`` (the trainer's own check) that the plain pass and
``FrozenTrueHalf.gradient`` give the same bits (gradient and BatchNorm running averages) and exits with 1
if not.
Every repetition times each variant once, in a rotating order; medians.

    python bench/gas_speed.py                    # calibration profile: 8 x 256 positions, 512-d, dsc_hidden 512
    python bench/gas_speed.py --profile paper    # WideResNet-50 at 288 px: 8 x 1296 positions, 1536-d, dsc_hidden 1024
    python bench/gas_speed.py --device cuda      # on a GPU (no pass by hand there: the trainer runs it on the CPU only)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench.machine import DEVICE_CHOICES, bench_device, describe_machine, int_range, synchronize  # noqa: E402

if TYPE_CHECKING:  # torch and the project are imported after the arguments are read
    import torch

    from model import Discriminator

PROFILES: Dict[str, dict] = {
    "cpu": dict(rows=8 * 16 * 16, dim=512, hidden=512, repeats=15),
    "paper": dict(rows=8 * 36 * 36, dim=1536, hidden=1024, repeats=5),
}


def variants(discriminator: Discriminator, true_feats: torch.Tensor) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The timed passes, each from synthetic features to their gradient."""
    import torch

    from glass import FrozenTrueHalf, ascent_gradient_from_scores
    from model import onednn_linear_available

    by_hand = FrozenTrueHalf(discriminator, true_feats)
    through_autograd = FrozenTrueHalf(discriminator, true_feats)
    through_autograd.by_hand = False
    first = discriminator.first_linear()

    def floor(gaus_feats: torch.Tensor) -> torch.Tensor:
        out = first(gaus_feats)
        return torch.autograd.grad(out, [gaus_feats], torch.ones_like(out))[0]
    passes = {"plain": lambda g: ascent_gradient_from_scores(discriminator(torch.cat([true_feats, g])), g),
              "frozen, autograd": through_autograd.gradient}
    if by_hand.by_hand:
        passes["frozen, by hand"] = by_hand.gradient
        if onednn_linear_available():
            passes["frozen, by hand, oneDNN"] = FrozenTrueHalf(discriminator, true_feats, onednn=True).gradient
    passes["floor"] = floor
    return passes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--repeats", type=int_range(1), default=None, help="timed repetitions (default: the profile's)")
    parser.add_argument("--threads", type=int_range(0), default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu", help="where the passes run (auto: CUDA, else MPS, else CPU)")
    args = parser.parse_args(argv)
    import torch  # after the arguments, so that --help and mistakes answer at once

    from glass import ascent_pass_is_exact
    from model import Discriminator

    device = bench_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    rows, dim, hidden = profile["rows"], profile["dim"], profile["hidden"]
    repeats = args.repeats or profile["repeats"]

    torch.manual_seed(0)
    discriminator = Discriminator(dim, n_layers=2, hidden=hidden).to(device)
    true_feats = torch.randn(rows, dim).to(device)
    gaus_feats = (true_feats + 0.015 * torch.randn(rows, dim).to(device)).requires_grad_(True)
    print(describe_machine(torch.get_num_threads(), device=device))
    print(f"Profile {args.profile}: {rows} true + {rows} synthetic features of {dim} values, dsc_hidden {hidden}; "
          f"{repeats} repetitions, medians")
    exact = ascent_pass_is_exact(discriminator, true_feats, noise_std=0.015)

    passes = variants(discriminator, true_feats)
    times: Dict[str, List[float]] = {name: [] for name in passes}
    names = list(passes)
    for name in names:  # warm-up
        passes[name](gaus_feats)
    synchronize(device)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            start = time.perf_counter()
            passes[name](gaus_feats)
            synchronize(device)
            times[name].append(time.perf_counter() - start)

    plain = statistics.median(times["plain"])
    print(f"{'ms per ascent pass':24}  {'median':>8}  {'/ plain':>8}")
    for name in names:
        value = statistics.median(times[name])
        print(f"{name:24}  {value * 1000:8.1f}  {value / plain:8.2f}")
    print("plain and FrozenTrueHalf.gradient: " + ("the same bits" if exact else
          "DIFFERENT BITS (the trainer's own check would run the plain passes here)"))
    if "frozen, by hand, oneDNN" in passes:
        plain_gradient = passes["plain"](gaus_feats)
        difference = (passes["frozen, by hand, oneDNN"](gaus_feats) - plain_gradient).abs().max() / plain_gradient.abs().max()
        print(f"oneDNN pass: largest gradient difference from the plain pass {difference.item():.1e} of its largest value")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())

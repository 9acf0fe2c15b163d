"""The ceiling a model's own matrix shapes allow: FLOP/s of the matmuls one training step of a decoder runs
(forward x·W and the two backward products, for every weight of a layer and the output projection at the
target positions), against a large square matmul, same threads, same dtype (float32).

    python benchmarks/gemm_ceiling.py [--threads 2] [--tokens 1024] [--targets 512]

Small hidden sizes give small matrices, and small matrices do not reach the large-matmul peak: a trainer on
such a model cannot either, however little else it does. This prints, per model of sweep.py, what share of the
large-matmul peak its matmuls reach on their own (no attention, norms, optimizer or Python around them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def step_gemms(hidden: int, layers: int, mlp: int, vocab: int, tokens: int, targets: int) -> tuple[float, float]:
    """(FLOPs, seconds) of one training step's matmuls: per layer q, k, v, o (d×d), gate, up (d×mlp), down
    (mlp×d); the output projection at `targets` rows; each forward, input-gradient and weight-gradient."""
    import torch

    shapes = [(tokens, hidden, hidden)] * 4 + [(tokens, hidden, mlp)] * 2 + [(tokens, mlp, hidden)]
    flops, seconds = 0.0, 0.0
    for rows, inner, outer in set(shapes) | {(targets, hidden, vocab)}:
        count = layers * shapes.count((rows, inner, outer)) if (rows, inner, outer) in shapes else 1
        x, w, g = torch.randn(rows, inner), torch.randn(inner, outer), torch.randn(rows, outer)
        t = (best_seconds(lambda: x @ w) + best_seconds(lambda: g @ w.T)  # noqa: B023
             + best_seconds(lambda: x.T @ g))  # noqa: B023
        flops += count * 3 * 2 * rows * inner * outer
        seconds += count * t
    return flops, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--targets", type=int, default=512)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from sweep import SIZES, VOCAB_SIZE

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peaks, reached = [], {}
    for name, (hidden, layers, _, mlp) in SIZES.items():  # the peak around every model: the load changes
        peaks.append(2 * 2048**3 / best_seconds(lambda: a @ b))
        flops, seconds = step_gemms(hidden, layers, mlp, VOCAB_SIZE + 9, args.tokens, args.targets)
        reached[name] = (hidden, mlp, flops / seconds)
    peaks.append(2 * 2048**3 / best_seconds(lambda: a @ b))
    peak = max(peaks)
    print(f"float32, {args.threads} threads, 2048² matmul: {peak / 1e9:.1f} GFLOP/s (best of "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}); a step of {args.tokens} tokens, {args.targets} targets")
    for name, (hidden, mlp, rate) in reached.items():
        print(f"  {name:5} (hidden {hidden:3}, MLP {mlp:4}): its matmuls alone reach {rate / 1e9:6.1f} GFLOP/s "
              f"= {100 * rate / peak:5.1f} % of the peak")


if __name__ == "__main__":
    main()

"""What bounds generation: one decoding step of the benchmark's model against its two limits (SPEC §12).

    python benchmarks/decode.py [--threads 2] [--rows 1,4,8,16,32,64] [--new-tokens 64] [--world DIR]

A decoding step feeds one token per row through the model with a KV cache. Its maths is 2·N FLOPs per row for
the decoder (flops.py's N) plus 2·d·V for the output layer, and it must read every weight once whatever the
number of rows: so its time can be no less than FLOPs / (matmul peak) nor than bytes / (memory bandwidth),
both measured here with the same threads. Per row count, this prints the time of a step of alignkit's sampler
(`alignkit.rl.rollout.generate`, --new-tokens steps, per step), of transformers' `generate` on the same
inputs, of the output layer's matrix product alone (one (rows × d) · (d × V) product, the largest of the
step), and the step's utilisation of the compute bound.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def sample_alignkit(model, prompts, n):
    import torch

    from alignkit.rl.rollout import generate

    generate(model, prompts, pad_id=0, eos_id=-1, max_new_tokens=n, generator=torch.Generator().manual_seed(1))


def sample_transformers(model, ids, n):
    import torch

    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                       max_new_tokens=n, min_new_tokens=n, pad_token_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,4,8,16,32,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--world", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import flops
    from transformers import AutoModelForCausalLM
    from world import build

    world_dir = Path(args.world or tempfile.mkdtemp(prefix="bench-world-"))
    if not (world_dir / "world.json").exists():
        (world_dir / "world.json").write_text(json.dumps(build(world_dir, 48)))
    path = json.loads((world_dir / "world.json").read_text())["policy"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    shape = flops.Shape.from_folder(path)
    head = model.get_output_embeddings().weight
    peak = flops.matmul_peak(args.threads)
    big = torch.randn(64 * 2 ** 20)  # 256 MB: far larger than any cache
    bandwidth = big.numel() * 4 / best(lambda: big.sum(), 10)
    weight_bytes = 4 * (shape.trunk + head.numel())
    print(f"{args.threads} threads: float32 matmul peak {peak / 1e9:.1f} GFLOP/s, memory read {bandwidth / 1e9:.1f} GB/s; "
          f"a step reads {weight_bytes / 2 ** 20:.0f} MB of weights ({shape.trunk / 1e6:.1f}M decoder, "
          f"{head.numel() / 1e6:.1f}M output layer)")
    print(f"{'rows':>4} {'FLOP bound ms':>13} {'byte bound ms':>13} {'alignkit ms':>11} {'transformers ms':>15} "
          f"{'output layer ms':>15} {'its GFLOP/s':>11} {'alignkit util':>13}")
    g = torch.Generator().manual_seed(0)
    for rows in [int(r) for r in args.rows.split(",")]:
        prompts = [torch.randint(5, shape.vocab - 1, (12,), generator=g).tolist() for _ in range(rows)]
        step_flops = rows * (2 * shape.trunk + 2 * shape.hidden * shape.vocab)
        n = args.new_tokens

        ids = torch.tensor(prompts)
        x = torch.randn(rows, shape.hidden)
        ours_s = best(functools.partial(sample_alignkit, model, prompts, n), 3) / n
        theirs_s = best(functools.partial(sample_transformers, model, ids, n), 3) / n
        head_s = best(functools.partial(torch.nn.functional.linear, x, head), 20)
        print(f"{rows:4d} {1e3 * step_flops / peak:13.2f} {1e3 * weight_bytes / bandwidth:13.2f} {1e3 * ours_s:11.2f} "
              f"{1e3 * theirs_s:15.2f} {1e3 * head_s:15.2f} {2 * rows * head.numel() / head_s / 1e9:11.1f} "
              f"{100 * step_flops / ours_s / peak:12.1f}%", flush=True)


if __name__ == "__main__":
    main()

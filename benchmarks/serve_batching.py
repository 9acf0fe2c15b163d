"""What batching buys `alignkit serve`: 64 concurrent chat requests against one request's time.

    python benchmarks/serve_batching.py [--threads 1] [--max-tokens 32] [--hidden 64 256]

For each model size, starts `alignkit serve` in a subprocess twice — batched (the default 10 ms window, up to
64 sequences per generation) and unbatched (`--max-batch-size 1`: one request per generation, as a server
without batching) — and with the official `openai` client measures the median of 5 single requests, then
the wall time of 64 requests sent at once from 64 threads, and the median time to the first text of 64
streaming requests sent at once. Greedy decoding (temperature 0) so every request generates the same tokens. Prints a markdown table; docs/serve.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPT = [{"role": "user", "content": "describe the red cat ->"}]


def start(model: str, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit", "serve", "--model", model, "--port", "0",
                             "--num-threads", str(threads), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    match = re.search(r"http://[\d.]+:\d+/v1", proc.stdout.readline())
    if not match:
        proc.kill()
        raise SystemExit("the server did not start")
    return proc, match.group(0)


def measure(url: str, max_tokens: int) -> tuple[float, float, float]:
    """(one request's median time, 64 concurrent requests' wall time, median time to the first streamed text
    of 64 concurrent streaming requests)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    ask = lambda _: client.chat.completions.create(model="m", messages=PROMPT, max_tokens=max_tokens, temperature=0)
    ask(0)
    singles = []
    for _ in range(5):
        start_time = time.perf_counter()
        ask(0)
        singles.append(time.perf_counter() - start_time)
    with ThreadPoolExecutor(64) as pool:
        start_time = time.perf_counter()
        list(pool.map(ask, range(64)))
        wall = time.perf_counter() - start_time

    def first_text(_) -> float:
        begin = time.perf_counter()
        first = None
        for chunk in client.chat.completions.create(model="m", messages=PROMPT, max_tokens=max_tokens, temperature=0,
                                                    stream=True):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - begin
        return first if first is not None else time.perf_counter() - begin

    with ThreadPoolExecutor(64) as pool:
        firsts = list(pool.map(first_text, range(64)))
    return statistics.median(singles), wall, statistics.median(firsts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    sys.path.insert(0, SRC)
    from alignkit.examples import make_tiny_model

    print("| model | server | one request | 64 concurrent | ratio | 64 streamed: first text |\n"
          "|---|---|---|---|---|---|")
    for hidden in args.hidden:
        model = str(make_tiny_model(Path(tempfile.mkdtemp()) / f"h{hidden}", hidden_size=hidden,
                                    num_layers=2 if hidden <= 64 else 4))
        for name, extra in (("batched", []), ("unbatched", ["--max-batch-size", "1"])):
            proc, url = start(model, args.threads, extra)
            try:
                one, wall, first = measure(url, args.max_tokens)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            print(f"| tiny Llama h{hidden} | {name} | {one * 1000:.0f} ms | {wall * 1000:.0f} ms | "
                  f"{wall / one:.1f}× | {first * 1000:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()

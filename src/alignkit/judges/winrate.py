"""`alignkit eval` (SPEC §9): the win rate of a model against a baseline under a judge, raw and length-controlled.

Both models answer every prompt with the same sampling settings and seed; the judge compares the two answers
(a pairwise judge in both orders, a flip being a tie). A win counts 1, a tie ½, a loss 0; a comparison the judge
failed is left out. The 95% interval is Wilson's score interval at the win rate and the number judged (with ties
counted half, the variance of an outcome is at most p(1 − p), so the interval is conservative).

Length control (AlpacaEval 2, Dubois et al. 2024): a logistic model of the outcome on the standardised length
difference, P(win) = σ(θ₀ + θ₁·tanh(Δ / sd(Δ))), Δ = len(model) − len(baseline) in characters (not centred, so a
model that is longer on average keeps that in Δ), fitted by Newton's method with ties as the target ½ (the same as
two half-observations) and a small ridge penalty; the length-controlled win rate is σ(θ₀), the model read at
Δ = 0. The KL is the mean sequence KL of the model to the baseline, Σ_t log π_A(y_t) − log π_B(y_t) on the
model's own samples, where both are local causal LMs with one vocabulary (else null).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from alignkit.data.formats import InvalidRecord, read_records
from alignkit.data.rows import parse_row, plain_text
from alignkit.errors import DataError
from alignkit.judges import Verdict, build_judge, read_principles, read_template

Z95 = 1.959963984540054


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion p observed over n trials."""
    if n == 0:
        return (0.0, 1.0)
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, center - half), min(1.0, center + half))


def lc_win_rate(outcomes: list[float], length_diffs: list[float], ridge: float = 0.1) -> float:
    """σ(θ₀) of the logistic fit P(win) = σ(θ₀ + θ₁·tanh(Δ / sd(Δ))) to outcomes in {0, ½, 1} (see the module doc).
    `ridge` penalises θ₁² (and θ₀² a thousand times less), which keeps the fit finite when length separates the
    outcomes."""
    if len(outcomes) != len(length_diffs):
        raise ValueError(f"{len(outcomes)} outcomes but {len(length_diffs)} length differences")
    if not outcomes:
        return float("nan")
    y = torch.tensor(outcomes, dtype=torch.float64)
    d = torch.tensor(length_diffs, dtype=torch.float64)
    sd = float(d.std()) if len(d) > 1 else 0.0
    f = torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)
    x = torch.stack([torch.ones_like(f), f], dim=1)                                        # (n, 2)
    penalty = torch.tensor([ridge * 1e-3, ridge], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (y - p) - penalty * theta
        hessian = (x.T * (p * (1 - p))) @ x + torch.diag(penalty)
        step = torch.linalg.solve(hessian, grad)
        theta = theta + step
        if float(step.abs().max()) < 1e-10:
            break
    return float(torch.sigmoid(theta[0]))


def outcome(verdict: Verdict) -> float | None:
    """The model's result (it is response 0): 1 a win, 0 a loss, ½ a tie, None a failure."""
    if verdict.failed:
        return None
    return 0.5 if verdict.winner is None else float(verdict.winner == 0)


def summarise(verdicts: list[Verdict], model_lengths: list[float], baseline_lengths: list[float],
              kl: float | None = None) -> dict:
    """eval.json's numbers from the verdicts (model first) and the two responses' lengths per prompt."""
    judged = [(outcome(v), a, b) for v, a, b in zip(verdicts, model_lengths, baseline_lengths)
              if outcome(v) is not None]
    ys = [y for y, _, _ in judged]
    n = len(ys)
    win = sum(ys) / n if n else float("nan")
    both = sum(v.both_orders for v in verdicts)
    return {
        "n": n, "win_rate": win, "win_rate_ci": list(wilson_interval(win, n)) if n else [0.0, 1.0],
        "win_rate_ci_method": "wilson 95%",
        "lc_win_rate": lc_win_rate(ys, [a - b for _, a, b in judged]) if n else float("nan"),
        "ties": sum(y == 0.5 for y in ys), "failures": len(verdicts) - n,
        "position_bias": sum(v.flipped for v in verdicts) / both if both else None,
        "mean_length": {"model": sum(model_lengths) / max(1, len(model_lengths)),
                        "baseline": sum(baseline_lengths) / max(1, len(baseline_lengths))},
        "length_unit": "characters", "kl": kl,
    }


def read_prompts(paths, limit: int = 0) -> list:
    prompts = []
    for path in paths:
        for where, record in read_records(path):
            if isinstance(record, InvalidRecord):
                raise DataError(where, record.message)
            prompts.append(parse_row(record, "prompts", where).prompt)
            if limit and len(prompts) >= limit:
                return prompts
    return prompts


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_eval(cfg) -> dict:
    """`alignkit eval`: see the module doc. Writes DIR/eval.json and DIR/verdicts.jsonl; returns eval.json."""
    from tqdm import tqdm

    from alignkit.data.tokenize import Encoder, same_vocabulary
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rl.evaluate import evaluate_policy
    from alignkit.rl.vllm_backend import generate_fn_for

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    prompts = read_prompts(cfg.data, cfg.max_prompts)
    out = Path(cfg.output_dir)
    judge = build_judge(cfg.judge, trust_remote_code=cfg.trust_remote_code, principles=read_principles(cfg.principles),
                        template=read_template(cfg.judge_template), cache_dir=cfg.cache_dir or out / "judge-cache",
                        dtype=cfg.dtype)
    loaded = {}
    for name in ("model", "baseline"):
        path = getattr(cfg, name)
        tokenizer = load_tokenizer(path, cfg.trust_remote_code)
        model = load_causal_lm(path, cfg.dtype, cfg.trust_remote_code, for_training=False).eval()
        loaded[name] = (model, tokenizer, Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length))
    same = same_vocabulary(loaded["model"][1], loaded["baseline"][1])
    sampled = {}
    for name, reference in (("model", loaded["baseline"][0] if same else None), ("baseline", None)):
        model, tokenizer, encoder = loaded[name]
        print(f"alignkit eval: sampling {len(prompts)} answers of the {name}", file=sys.stderr)
        sampled[name] = evaluate_policy(
            model, tokenizer, [(p, encoder.prompt_ids(p)) for p in prompts], reference=reference,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
            batch_size=cfg.batch_size, generate_fn=generate_fn_for(cfg, getattr(cfg, name)))
    answers = {name: sampled[name].responses for name in sampled}
    verdicts: list[Verdict] = []
    with tqdm(total=len(prompts), desc="judge", unit="prompt", file=sys.stderr, disable=None) as bar:
        for begin in range(0, len(prompts), cfg.batch_size):
            end = begin + cfg.batch_size
            verdicts += judge.compare_batch(list(zip(prompts[begin:end], answers["model"][begin:end],
                                                     answers["baseline"][begin:end])))
            bar.update(len(prompts[begin:end]))
    lengths = {name: [len(plain_text(r)) for r in answers[name]] for name in answers}
    kl = float(sampled["model"].kl.mean()) if same else None
    result = {**summarise(verdicts, lengths["model"], lengths["baseline"], kl), "judge": cfg.judge,
              "model": cfg.model, "baseline": cfg.baseline, "prompts": len(prompts),
              "mean_tokens": {name: float(sampled[name].lengths.float().mean()) for name in sampled}}
    out.mkdir(parents=True, exist_ok=True)
    names = {0: "model", 1: "baseline", None: "tie"}
    lines = [json.dumps({"prompt": p, "model": a, "baseline": b,
                         "winner": "failed" if v.failed else names[v.winner], "confidence": v.confidence,
                         "flipped": v.flipped, "length": {"model": la, "baseline": lb}}, ensure_ascii=False)
             for p, a, b, v, la, lb in zip(prompts, answers["model"], answers["baseline"], verdicts,
                                           lengths["model"], lengths["baseline"])]
    _write_atomic(out / "verdicts.jsonl", "".join(line + "\n" for line in lines))
    _write_atomic(out / "eval.json", json.dumps(result, indent=2) + "\n")
    print(format_summary(result))
    return result


def format_summary(r: dict) -> str:
    lo, hi = r["win_rate_ci"]
    bias = "n/a" if r["position_bias"] is None else f"{100 * r['position_bias']:.1f}%"
    kl = "n/a" if r["kl"] is None else f"{r['kl']:.3f} nats"
    return (f"win rate {100 * r['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] over {r['n']} prompts "
            f"({r['ties']} ties, {r['failures']} failures); length-controlled {100 * r['lc_win_rate']:.1f}%; "
            f"mean length {r['mean_length']['model']:.0f} vs {r['mean_length']['baseline']:.0f} characters; "
            f"position bias {bias}; KL {kl}")

"""`alignkit lab`: every method from the same SFT start and the same labelling budget, measured against the
gold reward of the lab's world (SPEC §7).

  base (cached)    → sft on annotator demonstrations
  crowd pairs      → reward model (the proxy) and an ensemble of reward models (same pairs, other seeds)
  expert rankings  → the judge: a reward model on a second team's 4-way rankings (Plackett–Luce), never trained
                     on by the online runs; their held-out reward, and rlaif_dpo's labeller
  from sft: ppo (proxy − KL), ppo_no_kl (the hacking control), ppo_ensemble — PPO with a value model and GAE —
            dpo, ipo, kto on the crowd's pairs, rlaif_dpo on the judge's labels of the same pairs, best-of-n
  full preset: a KL-coefficient sweep for ppo and a β sweep for dpo (the reward–KL frontier)
  every policy: gold, proxy, KL to sft, length, drift (flattery, repetition) and gold win rate against sft, on
  held-out prompts

Output: summary.json (SPEC §7) and report.html.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.lab import world as W
from alignkit.lab.base import base_model

PRESETS = {
    "quick": {"sft_demos": 2000, "pairs": 6000, "rm_epochs": 3, "ensemble_size": 3, "expert_rankings": 2000,
              "judge_epochs": 3, "rl_algo": "ppo", "rl_steps": 80, "rl_rollouts": 256, "rl_lr": 3e-4, "kl_coef": 0.5,
              "kl_budget": 3.0, "eval_every": 5, "eval_samples": 8, "bon_samples": 64,
              "bon_ns": (1, 2, 4, 8, 16, 32, 64), "beta": 0.5, "direct_lr": 1e-4, "direct_epochs": 1,
              "kl_sweep": (), "beta_sweep": ()},
    "full": {"sft_demos": 4000, "pairs": 10000, "rm_epochs": 3, "ensemble_size": 4, "expert_rankings": 3000,
             "judge_epochs": 3, "rl_algo": "ppo", "rl_steps": 150, "rl_rollouts": 256, "rl_lr": 3e-4, "kl_coef": 0.5,
             "kl_budget": 3.0, "eval_every": 5, "eval_samples": 16, "bon_samples": 128,
             "bon_ns": (1, 2, 4, 8, 16, 32, 64, 128), "beta": 0.5, "direct_lr": 1e-4, "direct_epochs": 1,
             "kl_sweep": (0.05, 0.15, 1.5), "beta_sweep": (0.1, 0.25, 1.0)},
}
SHORT = {"max_length": 32, "max_prompt_length": 16, "resume": "never"}
GOLD_FN = "python:alignkit.lab.world:gold_reward"
MEASURES_FN = "python:alignkit.lab.world:measures"  # drift and the experts' spot check
# The detector as the lab configures it (it never reads gold): the held-out judge disagreeing with the proxy
# (falling, or stalled while the policy travels: responses here are ≤ 10 tokens, so 0.25 nats is a long way),
# length drift, ensemble disagreement, the experts' spot check; the KL budget is a backstop only. Distinct-2 is
# off: it falls as a healthy policy settles on right answers (false flags). The stall's settings were chosen by
# replaying the detector over 15 logged runs (docs/lab.md).
DETECTOR = {"hacking_distinct_ratio": 0.0, "hacking_stall_kl": 0.25, "hacking_stall_ratio": 1.3}
SHOWN_BON = 4  # the best-of-n listed among the methods; summary.json's curves.bon has every n
ONLINE = ("ppo", "ppo_no_kl", "ppo_ensemble")


@dataclass
class Stages:
    quiet: bool = True
    timings: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Times a stage and prints a line for it; the trainers' own output stays quiet unless asked for."""
        started = time.perf_counter()
        print(f"lab: {name} ...", file=sys.stderr, flush=True)
        with contextlib.ExitStack() as sinks:
            if self.quiet:
                sinks.enter_context(contextlib.redirect_stderr(io.StringIO()))
                sinks.enter_context(contextlib.redirect_stdout(io.StringIO()))
            yield
        self.timings[name] = round(time.perf_counter() - started, 1)
        print(f"lab: {name} done in {self.timings[name]:.0f} s", file=sys.stderr, flush=True)


def run_lab(preset: str = "quick", seed: int = 0, output_dir: str = "runs/lab", cache: str | None = None,
            quiet: bool = True) -> dict:
    from alignkit.config import DPOConfig, KTOConfig, PPOConfig, RewardConfig, SFTConfig
    from alignkit.examples import write_jsonl
    from alignkit.train.dpo import train_dpo
    from alignkit.train.kto import train_kto
    from alignkit.train.ppo import train_ppo
    from alignkit.train.reward import train_reward
    from alignkit.train.sft import train_sft

    if preset not in PRESETS:
        from alignkit.errors import UserError

        raise UserError(f'preset must be one of {", ".join(PRESETS)}, not "{preset}"')
    started = time.perf_counter()
    p = PRESETS[preset]
    lab = Stages(quiet)
    out = Path(output_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    with lab.stage("base model"):
        base = str(base_model(cache, quiet=True))
    train_prompts, heldout = W.split_prompts(seed)
    pairs = W.pairwise_rows(train_prompts, p["pairs"], seed, W.CROWD)
    data = {
        "sft": write_jsonl(out / "data" / "sft.jsonl", W.sft_rows(train_prompts, p["sft_demos"], seed)),
        "pairs": write_jsonl(out / "data" / "pairs.jsonl", pairs),
        "rankings": write_jsonl(out / "data" / "expert_rankings.jsonl",
                                W.ranked_rows(train_prompts, p["expert_rankings"], seed + 1, 4, W.EXPERTS)),
        "pool": write_jsonl(out / "data" / "rlaif_pool.jsonl", rlaif_pool(pairs, seed)),
        "prompts": write_jsonl(out / "data" / "prompts.jsonl", [{"prompt": q} for q in train_prompts]),
        "heldout": write_jsonl(out / "data" / "heldout.jsonl", [{"prompt": q} for q in heldout]),
    }
    common = {"seed": seed, **SHORT}
    with lab.stage("sft"):
        train_sft(SFTConfig(model=base, data=(str(data["sft"]),), output_dir=str(out / "sft"), epochs=1, batch_size=8,
                            lr=1e-3, log_every=25, **common))
    sft = str(out / "sft" / "final")
    rms = []
    for i in range(p["ensemble_size"]):
        name = "reward_model" if i == 0 else f"reward_model_{i}"
        with lab.stage(name):
            train_reward(RewardConfig(model=sft, data=(str(data["pairs"]),), output_dir=str(out / name),
                                      epochs=p["rm_epochs"], batch_size=32, lr=1e-3, log_every=25,
                                      **{**common, "seed": seed * 1000 + i}))
        rms.append(str(out / name / "final"))
    with lab.stage("judge"):
        train_reward(RewardConfig(model=sft, data=(str(data["rankings"]),), output_dir=str(out / "judge"),
                                  epochs=p["judge_epochs"], batch_size=32, lr=1e-3, log_every=25, **common))
    judge = str(out / "judge" / "final")

    rl = {"model": sft, "data": (str(data["prompts"]),), "eval_data": (str(data["heldout"]),), "algo": p["rl_algo"],
          "gold_fn": GOLD_FN, "eval_fn": MEASURES_FN, "max_steps": p["rl_steps"], "rollout_batch_size": p["rl_rollouts"],
          "max_new_tokens": 10, "lr": p["rl_lr"], "eval_every": p["eval_every"],
          "eval_samples_per_prompt": p["eval_samples"], "save_every": 0, "log_every": 1,
          "heldout_reward_models": (judge,), **DETECTOR, "hacking_kl_budget": p["kl_budget"], **common}
    online = {"ppo": {"reward_model": rms[0], "kl_coef": p["kl_coef"]},
              "ppo_no_kl": {"reward_model": rms[0], "kl_coef": 0.0},
              "ppo_ensemble": {"reward_models": tuple(rms), "ensemble": "uwo", "kl_coef": p["kl_coef"]}}
    sweep_online = {f"ppo_kl_{c:g}": {"reward_model": rms[0], "kl_coef": c} for c in p["kl_sweep"]}
    for name, extra in {**online, **sweep_online}.items():
        with lab.stage(name):
            train_ppo(PPOConfig(output_dir=str(out / name), **rl, **extra))
    direct = {"model": sft, "data": (str(data["pairs"]),), "beta": p["beta"], "lr": p["direct_lr"],
              "epochs": p["direct_epochs"], "batch_size": 16, "log_every": 25, **common}
    with lab.stage("dpo"):
        train_dpo(DPOConfig(output_dir=str(out / "dpo"), loss="sigmoid", **direct))
    with lab.stage("ipo"):
        train_dpo(DPOConfig(output_dir=str(out / "ipo"), loss="ipo", **direct))
    with lab.stage("kto"):
        train_kto(KTOConfig(output_dir=str(out / "kto"), **direct))
    with lab.stage("rlaif labels"):
        rlaif = label_pool(judge, data["pool"], out / "data" / "rlaif_pairs.jsonl", pairs)
    with lab.stage("rlaif_dpo"):
        train_dpo(DPOConfig(output_dir=str(out / "rlaif_dpo"), loss="sigmoid",
                            **{**direct, "data": (str(out / "data" / "rlaif_pairs.jsonl"),)}))
    sweep_direct = {f"dpo_beta_{b:g}": b for b in p["beta_sweep"]}
    for name, beta in sweep_direct.items():
        with lab.stage(name):
            train_dpo(DPOConfig(output_dir=str(out / name), loss="sigmoid", **{**direct, "beta": beta}))

    with lab.stage("evaluation"):
        proxy = PPOConfig(model=sft, data=(str(data["heldout"]),), reward_model=rms[0])  # how the proxy scores
        evaluator = Evaluator(sft, proxy, heldout, p["eval_samples"], seed)
        baseline = evaluator(sft)
        methods = {"sft": summarise(baseline, baseline)}
        for name in ("dpo", "ipo", "kto", *online, "rlaif_dpo"):
            methods[name] = summarise(evaluator(str(out / name / "final")), baseline)
        sweeps = {name: summarise(evaluator(str(out / name / "final")), baseline)
                  for name in (*sweep_online, *sweep_direct)}
    with lab.stage("best-of-n"):
        bon_curve, bon_methods, bon_fit = best_of_n(evaluator, p["bon_samples"], p["bon_ns"], baseline)
        methods.update(bon_methods)
    curves = {name: read_curve(out / name) for name in online}
    curves["bon"] = bon_curve
    hacking = {name: hacking_summary(out / name, curves[name]) for name in online}
    summary = {"preset": preset, "seed": seed, "elapsed_s": round(time.perf_counter() - started, 1),
               "rl_algo": p["rl_algo"], "methods": methods, "curves": curves, "hacking": hacking,
               "bon_fit": bon_fit, "rl_fit": {"ppo_no_kl": rl_fit(curves["ppo_no_kl"])}, "rlaif": rlaif,
               "frontier": frontier(methods, sweeps, p), "timings_s": lab.timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    from alignkit.lab.report import write_report

    write_report(summary, out / "report.html")
    print(format_table(summary))
    print(f"lab: done in {summary['elapsed_s']:.0f} s; {out / 'summary.json'}\nreport: {(out / 'report.html').resolve()}")
    return summary


def rlaif_pool(pairs: list[dict], seed: int) -> list[dict]:
    """The crowd's pairs without their labels, for the AI judge: {prompt, responses: [a, b], label} in a seeded
    random order, with `label` the index of the gold-better response (absent on gold ties) so that `alignkit label`
    reports the judge's agreement with gold."""
    import random

    rng = random.Random(f"pool-{seed}")
    rows = []
    for r in pairs:
        a, b = (r["chosen"], r["rejected"]) if rng.random() < 0.5 else (r["rejected"], r["chosen"])
        ga, gb = W.gold_reward([r["prompt"]] * 2, [a, b])
        rows.append({"prompt": r["prompt"], "responses": [a, b], **({"label": 0 if ga > gb else 1} if ga != gb else {})})
    return rows


def label_pool(judge: str, pool: Path, output: Path, crowd_pairs: list[dict]) -> dict:
    """`alignkit label` with the judge (rm:) over the pool; returns what the judge is, its measured agreement with
    gold (the crowd's on the same pairs beside it), and its liking for longer and for flattering answers."""
    from alignkit.config import LabelConfig
    from alignkit.judges.label import run_label

    report = run_label(LabelConfig(judge=f"rm:{judge}", data=(str(pool),), output=str(output), resume="never"))
    labelled = [json.loads(line) for line in output.read_text().splitlines()]
    return {"judge": "a reward model trained on the expert annotators' 4-way rankings, labelling the crowd's pairs",
            "pairs": len(labelled), "agreement_with_gold": report.get("agreement"),
            "judge_picks_longer": _share(labelled, lambda c, r: len(c.split()) > len(r.split()),
                                         lambda c, r: len(c.split()) != len(r.split())),
            "judge_picks_flattering": _share(labelled, lambda c, r: _flattery(c) > _flattery(r),
                                             lambda c, r: _flattery(c) != _flattery(r)),
            "crowd_agreement_with_gold": _gold_agreement(crowd_pairs)}


def _flattery(text: str) -> int:
    return sum(w in W.FLATTERY for w in text.split())


def _share(rows: list[dict], picked, counts) -> float | None:
    """Among labelled pairs where `counts(chosen, rejected)`, the share where `picked(chosen, rejected)`."""
    kept = [r for r in rows if counts(r["chosen"], r["rejected"])]
    return sum(picked(r["chosen"], r["rejected"]) for r in kept) / len(kept) if kept else None


def _gold_agreement(pairs: list[dict]) -> float | None:
    """Share of the pairs without a gold tie whose `chosen` is the gold-better response."""
    golds = [W.gold_reward([r["prompt"]] * 2, [r["chosen"], r["rejected"]]) for r in pairs]
    hits = [gc > gr for gc, gr in golds if gc != gr]
    return sum(hits) / len(hits) if hits else None


def rl_fit(curve: list[dict]) -> dict | None:
    """Gao et al.'s RL form, gold gain over the first evaluation = d(α − β log d) with d = √KL, fitted to an
    online run's curve up to its largest KL of 50 nats (where the form has room; beyond, the policy has left the
    reward model's world); None when there are too few points."""
    from alignkit.bon import fit_rl_curve

    points = [(math.sqrt(max(c["kl"], 0.0)), c["gold"] - curve[0]["gold"]) for c in curve[1:] if c["kl"] <= 50]
    try:
        return fit_rl_curve([d for d, _ in points], [g for _, g in points])
    except ValueError:
        return None


def frontier(methods: dict, sweeps: dict, p: dict) -> dict:
    """Gold against KL for the ppo KL-coefficient sweep and the dpo β sweep (the preset's own values included),
    sorted by KL: the reward–KL frontier of the DPO paper, beside best-of-n."""
    ppo = [{"kl_coef": p["kl_coef"], **methods["ppo"]}] + [
        {"kl_coef": float(k.rsplit("_", 1)[1]), **m} for k, m in sweeps.items() if k.startswith("ppo_kl_")]
    dpo = [{"beta": p["beta"], **methods["dpo"]}] + [
        {"beta": float(k.rsplit("_", 1)[1]), **m} for k, m in sweeps.items() if k.startswith("dpo_beta_")]
    return {"ppo": sorted(ppo, key=lambda m: m["kl"]), "dpo": sorted(dpo, key=lambda m: m["kl"])}


def format_table(summary: dict) -> str:
    """The methods as a plain-text table: gold and proxy reward, KL to SFT, length, share of flattering answers,
    gold win rate vs SFT, and where the hacking detector flagged (and on which signals)."""
    rows = [("method", "gold", "proxy", "KL", "length", "flattery", "win vs sft", "hacking flag")]
    for name, m in summary["methods"].items():
        flag = summary["hacking"].get(name, {})
        why = ", ".join(k for k, v in flag.get("signals", {}).items() if v.get("sustained") == flag.get("flag_step"))
        flattery = f"{100 * m['flattery']:.0f}%" if "flattery" in m else ""
        rows.append((name, f"{m['gold']:.3f}", f"{m['proxy']:.3f}", f"{m['kl']:.2f}", f"{m['length']:.1f}", flattery,
                     f"{100 * m['win_rate_vs_sft']:.0f}%",
                     "" if not flag.get("flagged") else f"iteration {flag['flag_step']}" + (f" ({why})" if why else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Evaluator:
    """Samples a policy on the held-out prompts (as in training: temperature 1, same seed for every policy) and
    measures proxy, gold, KL to the SFT policy and length."""

    def __init__(self, sft: str, proxy_cfg, prompts: list[str], samples: int, seed: int):
        from alignkit.models.load import load_causal_lm, load_tokenizer
        from alignkit.rewards import Scorer

        self.tokenizer = load_tokenizer(sft)
        self.reference = load_causal_lm(sft, for_training=False).eval()
        self.scorer = Scorer(proxy_cfg, policy_tokenizer=self.tokenizer)
        self.prompts = [(q, self.tokenizer(q).input_ids) for q in prompts]
        self.samples, self.seed, self.sft = samples, seed, sft

    def __call__(self, model_dir: str, samples: int | None = None, stream: int = 0):
        """Every policy gets the same draws (common random numbers) for a given `stream`."""
        from alignkit.models.load import load_causal_lm
        from alignkit.rl.evaluate import evaluate_policy

        policy = load_causal_lm(model_dir, for_training=False).eval()
        return evaluate_policy(policy, self.tokenizer, self.prompts, reference=self.reference, scorer=self.scorer,
                               gold=W.gold_reward, samples_per_prompt=samples or self.samples, max_new_tokens=10,
                               seed=self.seed * 1_000_003 + 999_983 + 7919 * stream, batch_size=512)


def win_rate(gold, baseline_gold) -> float:
    """Share of paired samples (same prompt, same draw index) where the method's gold beats the baseline's; ties
    count half."""
    wins = (gold > baseline_gold).float() + 0.5 * (gold == baseline_gold).float()
    return float(wins.mean())


def summarise(ev, baseline) -> dict:
    """A method's row: gold, proxy, KL to SFT, length (tokens), gold win rate vs SFT, and the drift measures of
    its samples (shares with flattery, repetition and filler; mean words)."""
    s = ev.summary()
    drift = W.drift(ev.prompts, ev.responses)
    return {"gold": s["reward/gold"], "proxy": s["reward/score"], "kl": s["kl"], "length": s["response_length"],
            "win_rate_vs_sft": win_rate(ev.gold, baseline.gold), **drift}


def best_of_n(evaluator: Evaluator, samples: int, ns, baseline) -> tuple[list, dict, dict]:
    """Best-of-n against the proxy, from the SFT policy: for each n, the unbiased estimate over `samples` draws
    per prompt of the chosen response's gold, proxy, length and gold win rate against an SFT sample; then the
    gold gain over n = 1 fitted to d(α − βd) with d = √KL (Gao et al. 2022)."""
    import torch

    from alignkit.bon import best_of_n_weights, fit_bon_curve, kl_bound

    ev = evaluator(evaluator.sft, samples, stream=1)  # draws independent of the SFT baseline's
    count = len(evaluator.prompts)
    proxy, gold = ev.proxy.view(count, samples), ev.gold.view(count, samples)
    lengths = ev.lengths.view(count, samples).float()
    sft_gold = baseline.gold.view(count, -1)
    # (P, S): chance that each draw beats a random SFT sample of its prompt under gold (ties half)
    beats = ((gold.unsqueeze(-1) > sft_gold.unsqueeze(1)).float()
             + 0.5 * (gold.unsqueeze(-1) == sft_gold.unsqueeze(1)).float()).mean(-1)
    curve = []
    for n in (n for n in ns if n <= samples):
        weights = torch.tensor([best_of_n_weights(row.tolist(), n) for row in proxy])         # (P, S)
        point = {"n": n, "kl": kl_bound(n), "gold": float((weights * gold).sum(-1).mean()),
                 "proxy": float((weights * proxy).sum(-1).mean()),
                 "length": float((weights * lengths).sum(-1).mean()),
                 "win_rate_vs_sft": float((weights * beats).sum(-1).mean())}
        curve.append(point)
    methods = {f"bon_{c['n']}": {k: v for k, v in c.items() if k != "n"} for c in curve if c["n"] == SHOWN_BON}
    fit = fit_bon_curve([math.sqrt(c["kl"]) for c in curve], [c["gold"] - curve[0]["gold"] for c in curve])
    return curve, methods, fit


def read_curve(run: Path) -> list[dict]:
    """Per evaluation of an online run: step, KL, gold, proxy, length and the drift measures on the held-out
    prompts, and the five tokens whose share of the training rollouts rose most since the start (what the policy
    learned to say more, from samples.jsonl), where that step wrote samples."""
    rising = {}
    if (run / "samples.jsonl").is_file():
        for line in (run / "samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            rising[row["step"]] = [t["token"] for t in row.get("rising_tokens", [])[:5]]
    curve = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "eval/reward/gold" in m:
            curve.append({"step": m["step"], "kl": m["eval/kl"], "gold": m["eval/reward/gold"],
                          "proxy": m["eval/reward/score"], "length": m["eval/response_length"],
                          **{k: m[f"eval/{k}"] for k in ("flattery", "repetition", "filler", "words", "audit_approved",
                                                         "audit_n")
                             if f"eval/{k}" in m},
                          **({"rising_tokens": rising[m["step"]]} if m["step"] in rising else {})})
    return curve


def smoothed(values: list[float], window: int = 3) -> list[float]:
    """Centred moving average over `window` evaluations (fewer at the ends), so that a peak stays where it is."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def hacking_summary(run: Path, curve: list[dict]) -> dict:
    """Whether the detector flagged the run (it never reads gold), when, where gold peaked (centred 3-evaluation
    average) and which step the run would keep (the flag's, else the last)."""
    done = json.loads((run / "final" / "alignkit_run.json").read_text())
    flag = (done.get("hacking") or {})
    gold = smoothed([c["gold"] for c in curve])
    peak = curve[max(range(len(curve)), key=gold.__getitem__)]["step"] if curve else None
    return {"flagged": bool(flag.get("flagged")), "flag_step": flag.get("flag_step"), "peak_gold_step": peak,
            "chosen_step": flag.get("flag_step") if flag.get("flagged") else (curve[-1]["step"] if curve else None),
            "reasons": flag.get("reasons", []), "signals": flag.get("fired", {}),
            "audit_checked": int(sum(c.get("audit_n", 0) for c in curve)),  # the experts' spot-check budget
            "evaluations_after_peak": (None if not flag.get("flagged") or peak is None
                                       else _evaluations_between(curve, peak, flag["flag_step"]))}


def _evaluations_between(curve: list[dict], peak: int, flag: int) -> float:
    """How many evaluations after the gold peak the flag came (negative: before it), in evaluation intervals."""
    steps = [c["step"] for c in curve]
    every = (steps[-1] - steps[0]) / max(1, len(steps) - 1)
    return round((flag - peak) / every, 1) if every > 0 else 0.0


def gain_kept(curve: list[dict]) -> float:
    """Final smoothed gold gain over the first evaluation as a share of the peak smoothed gain (nan if no gain);
    SPEC §7's "gain" on a 3-evaluation moving average."""
    gold = smoothed([c["gold"] for c in curve])
    gains = [g - curve[0]["gold"] for g in gold]
    peak = max(gains)
    return gains[-1] / peak if peak > 0 else math.nan

"""report.html for a lab run (SPEC §7): gold vs KL for every method, the reward–KL frontier (ppo's KL sweep, dpo's
β sweep and best-of-n, full preset), proxy and gold across the online runs with the detector's flag, Best-of-N gold
vs √KL with its fit and ppo_no_kl's RL-form fit, response length, flattery and the experts' spot check over training,
and a table."""

from __future__ import annotations

import html
import math
from pathlib import Path

from alignkit.plots import chart

ONLINE = ("ppo", "ppo_no_kl", "ppo_ensemble")


def write_report(summary: dict, path: Path) -> None:
    methods, curves, hacking = summary["methods"], summary["curves"], summary["hacking"]
    parts = [f"<h1>alignkit lab — preset {html.escape(summary['preset'])}, seed {summary['seed']}</h1>",
             f"<p>{summary['elapsed_s']:.0f} s. Online runs use the {html.escape(summary['rl_algo'])} estimator. "
             "Gold is the world's true reward on held-out prompts; proxy is the reward model trained on the "
             "simulated crowd annotators' (biased, noisy) preferences; KL is the mean sequence KL to the SFT policy, measured "
             "on samples, except for best-of-n, whose KL is the analytical bound log n − (n−1)/n (an upper bound: "
             "identical samples make the real KL smaller). Held-out prompts are held out of every alignment "
             "data set; the base model saw every prompt of the world in pretraining.</p>"]
    # a method far beyond the others' KL (the hacked run) would squash every other point into a corner: it is
    # named in the title instead
    kls = sorted(m["kl"] for m in methods.values())
    limit = 5 * max(kls[-2] if len(kls) > 1 else kls[-1], 0.1)
    shown = {name: m for name, m in methods.items() if m["kl"] <= limit}
    off = "; ".join(f"{name} off the chart at KL {m['kl']:.1f}, gold {m['gold']:.2f}"
                    for name, m in methods.items() if name not in shown)
    parts.append(chart([{"label": name, "x": [m["kl"]], "y": [m["gold"]], "style": "points", "labels": [name]}
                        for name, m in shown.items()],
                       title="Gold reward vs KL to SFT, every method", xlabel="KL (nats)", ylabel="gold"))
    if off:
        parts.append(f"<p class='off-chart'>Not drawn: {html.escape(off)}.</p>")
    front = summary.get("frontier") or {}
    if len(front.get("ppo", [])) > 1 or len(front.get("dpo", [])) > 1:
        series = [{"label": "ppo (KL coefficient)", "x": [m["kl"] for m in front["ppo"]],
                   "y": [m["gold"] for m in front["ppo"]], "style": "both",
                   "labels": [f"{m['kl_coef']:g}" for m in front["ppo"]]},
                  {"label": "dpo (β)", "x": [m["kl"] for m in front["dpo"]], "y": [m["gold"] for m in front["dpo"]],
                   "style": "both", "labels": [f"β {m['beta']:g}" for m in front["dpo"]]}]
        bon = curves.get("bon") or []
        if bon:
            series.append({"label": "best-of-n (KL bound)", "x": [c["kl"] for c in bon], "y": [c["gold"] for c in bon],
                           "style": "both", "labels": [f"n={c['n']}" for c in bon]})
        parts.append(chart(series, title="Reward–KL frontier: gold vs KL to SFT", xlabel="KL (nats)", ylabel="gold"))
    for name in ONLINE:
        curve = curves.get(name) or []
        if not curve:
            continue
        steps = [c["step"] for c in curve]
        flag = hacking.get(name, {})
        why = ", ".join(k for k, v in (flag.get("signals") or {}).items() if v.get("sustained") == flag.get("flag_step"))
        marks = [{"x": flag["flag_step"], "label": f"flag ({why})" if why else "flag"}] if flag.get("flagged") else []
        if flag.get("peak_gold_step") is not None:
            marks.append({"x": flag["peak_gold_step"], "label": "gold peak"})
        parts.append(chart([{"label": "proxy", "x": steps, "y": [c["proxy"] for c in curve]},
                            {"label": "gold", "x": steps, "y": [c["gold"] for c in curve]}],
                           title=f"{name}: proxy and gold across training", xlabel="iteration",
                           ylabel="reward (held-out prompts)", vlines=marks))
    bon = curves.get("bon") or []
    if bon:
        d = [math.sqrt(c["kl"]) for c in bon]
        base = bon[0]["gold"]
        fit = summary.get("bon_fit") or {}
        series = [{"label": "gold gain", "x": d, "y": [c["gold"] - base for c in bon], "style": "both"},
                  {"label": "proxy gain", "x": d, "y": [c["proxy"] - bon[0]["proxy"] for c in bon], "style": "both"}]
        if fit:
            grid = [max(d) * i / 40 for i in range(41)]
            series.append({"label": f"fit R²={fit['r2']:.2f}", "x": grid,
                           "y": [x * (fit["alpha"] - fit["beta"] * x) for x in grid]})
        parts.append(chart(series, title="Best-of-N: gain over n = 1 vs √KL", xlabel="√KL = √(log n − (n−1)/n)",
                           ylabel="gain"))
    fit = (summary.get("rl_fit") or {}).get("ppo_no_kl")
    curve = curves.get("ppo_no_kl") or []
    if fit and curve:
        d = [math.sqrt(max(c["kl"], 0.0)) for c in curve]
        grid = [max(d) * i / 60 for i in range(1, 61)]
        bon_fit = summary.get("bon_fit") or {}
        series = [{"label": "ppo_no_kl gold gain", "x": d, "y": [c["gold"] - curve[0]["gold"] for c in curve],
                   "style": "points"},
                  {"label": f"RL form d(α − β log d), R²={fit['r2']:.2f}", "x": grid,
                   "y": [x * (fit["alpha"] - fit["beta"] * math.log(x)) for x in grid]}]
        if bon_fit:
            bon_grid = [x for x in grid if x <= 3]
            series.append({"label": "best-of-n fit d(α − βd)", "x": bon_grid,
                           "y": [x * (bon_fit["alpha"] - bon_fit["beta"] * x) for x in bon_grid]})
        parts.append(chart(series, title="Scaling laws (Gao et al. 2022): gold gain vs √KL", xlabel="d = √KL",
                           ylabel="gold gain over SFT"))
    length_series = [{"label": name, "x": [c["step"] for c in curves[name]], "y": [c["length"] for c in curves[name]]}
                     for name in ONLINE if curves.get(name)]
    if length_series:
        parts.append(chart(length_series, title="Response length over training", xlabel="iteration",
                           ylabel="tokens"))
    flattery_series = [{"label": name, "x": [c["step"] for c in curves[name]], "y": [c["flattery"] for c in curves[name]]}
                       for name in ONLINE if curves.get(name) and "flattery" in curves[name][0]]
    if flattery_series:
        parts.append(chart(flattery_series, title="Share of flattering answers over training (held-out prompts)",
                           xlabel="iteration", ylabel="share"))
    audit_series = [{"label": name, "x": [c["step"] for c in curves[name]],
                     "y": [c["audit_approved"] / c["audit_n"] for c in curves[name]]}
                    for name in ONLINE if curves.get(name) and curves[name][0].get("audit_n")]
    if audit_series:
        parts.append(chart(audit_series, title="The experts' spot check: share of answers approved",
                           xlabel="iteration", ylabel="approved"))
    learned = []
    for name in ONLINE:
        points = [c for c in curves.get(name) or [] if c.get("rising_tokens")]
        if points:
            cells = "".join(f"<tr><td>{c['step']}</td><td>{c['gold']:.3f}</td><td>{_share(c.get('flattery'))}</td>"
                            f"<td>{c['length']:.1f}</td><td>{html.escape(' '.join(c['rising_tokens']))}</td></tr>"
                            for c in points)
            learned.append(f"<div style='display:inline-block;vertical-align:top;margin-right:16px'>"
                           f"<h3>{html.escape(name)}</h3><table border='1' cellpadding='3' cellspacing='0'><tr>"
                           "<th>it.</th><th>gold</th><th>flattery</th><th>length</th>"
                           f"<th>says more</th></tr>{cells}</table></div>")
    if learned:
        parts.append("<h2>What the policies learned to say more</h2><p>At each evaluation: gold and the share of "
                     "flattering answers on held-out prompts, length in tokens, and the five tokens whose share of the "
                     "training rollouts rose most since the start.</p>" + "".join(learned))
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{m['gold']:.3f}</td><td>{m['proxy']:.3f}</td><td>{m['kl']:.3f}</td>"
        f"<td>{m['length']:.2f}</td><td>{_share(m.get('flattery'))}</td><td>{_share(m.get('repetition'))}</td>"
        f"<td>{m['win_rate_vs_sft']:.3f}</td></tr>" for name, m in methods.items())
    parts.append("<h2>Methods</h2><table border='1' cellpadding='4' cellspacing='0'><tr><th>method</th><th>gold</th>"
                 "<th>proxy</th><th>KL</th><th>length</th><th>flattering answers</th><th>repeating answers</th>"
                 f"<th>win rate vs SFT (gold)</th></tr>{rows}</table>")
    rlaif = summary.get("rlaif")
    if rlaif:
        parts.append(f"<h2>RLAIF</h2><p>The judge: {html.escape(rlaif['judge'])}. On the {rlaif['pairs']} pairs of the "
                     f"pool it agrees with gold on {_share(rlaif.get('agreement_with_gold'))} (the crowd: "
                     f"{_share(rlaif.get('crowd_agreement_with_gold'))}); where the two answers differ in length it picks "
                     f"the longer {_share(rlaif.get('judge_picks_longer'))}, and where they differ in flattery the more "
                     f"flattering {_share(rlaif.get('judge_picks_flattering'))}.</p>")
    flags = "".join(
        f"<li>{html.escape(name)}: {'flagged at iteration ' + str(h['flag_step']) if h['flagged'] else 'not flagged'}"
        f"; gold peaked (3-evaluation average) at iteration {h['peak_gold_step']}"
        f"{' — ' + html.escape('; '.join(h['reasons'])) if h.get('reasons') else ''}"
        f"{_signals(h.get('signals') or {})}</li>"
        for name, h in hacking.items())
    parts.append(f"<h2>Reward-hacking detector (never reads gold)</h2><ul>{flags}</ul>")
    path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>alignkit lab</title></head>"
                    "<body style='font-family:sans-serif;max-width:1100px'>" + "\n".join(parts) + "</body></html>",
                    encoding="utf-8")


def _share(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _signals(fired: dict) -> str:
    if not fired:
        return ""
    items = [f"{name}: first at iteration {v['first']}"
             + (f", sustained at {v['sustained']}" if v.get("sustained") is not None else "") for name, v in fired.items()]
    return " (signals: " + html.escape("; ".join(items)) + ")"

"""report.html for a lab run (SPEC §7): gold vs KL for every method, proxy and gold across the online runs with
the detector's flag, Best-of-N gold vs √KL with the fitted curve, response length over training, and a table."""

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
             "simulated annotators' (biased, noisy) preferences; KL is the mean sequence KL to the SFT policy, measured "
             "on samples, except for best-of-n, whose KL is the analytical bound log n − (n−1)/n (an upper bound: "
             "identical samples make the real KL smaller). Held-out prompts are held out of every alignment "
             "data set; the base model saw every prompt of the world in pretraining.</p>"]
    parts.append(chart([{"label": name, "x": [m["kl"]], "y": [m["gold"]], "style": "points", "labels": [name]}
                        for name, m in methods.items()],
                       title="Gold reward vs KL to SFT, every method", xlabel="KL (nats)", ylabel="gold"))
    for name in ONLINE:
        curve = curves.get(name) or []
        if not curve:
            continue
        steps = [c["step"] for c in curve]
        flag = hacking.get(name, {})
        marks = [{"x": flag["flag_step"], "label": "flag"}] if flag.get("flagged") else []
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
    length_series = [{"label": name, "x": [c["step"] for c in curves[name]], "y": [c["length"] for c in curves[name]]}
                     for name in ONLINE if curves.get(name)]
    if length_series:
        parts.append(chart(length_series, title="Response length over training", xlabel="iteration",
                           ylabel="tokens"))
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{m['gold']:.3f}</td><td>{m['proxy']:.3f}</td><td>{m['kl']:.3f}</td>"
        f"<td>{m['length']:.2f}</td><td>{m['win_rate_vs_sft']:.3f}</td></tr>" for name, m in methods.items())
    parts.append("<h2>Methods</h2><table border='1' cellpadding='4' cellspacing='0'><tr><th>method</th><th>gold</th>"
                 f"<th>proxy</th><th>KL</th><th>length</th><th>win rate vs SFT (gold)</th></tr>{rows}</table>")
    flags = "".join(
        f"<li>{html.escape(name)}: {'flagged at iteration ' + str(h['flag_step']) if h['flagged'] else 'not flagged'}"
        f"; gold peaked (3-evaluation average) at iteration {h['peak_gold_step']}"
        f"{' — ' + html.escape('; '.join(h['reasons'])) if h.get('reasons') else ''}</li>"
        for name, h in hacking.items())
    parts.append(f"<h2>Reward-hacking detector (never reads gold)</h2><ul>{flags}</ul>")
    path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>alignkit lab</title></head>"
                    "<body style='font-family:sans-serif;max-width:1100px'>" + "\n".join(parts) + "</body></html>",
                    encoding="utf-8")

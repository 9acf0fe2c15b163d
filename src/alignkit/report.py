"""`alignkit report RUN_DIR [RUN_DIR ...]`: one self-contained HTML file for any runs (SPEC §5, §6).

It reads only what every run folder holds (config.yaml, metrics.jsonl, final/alignkit_run.json; for online runs
hacking.json and samples.jsonl), so it works on finished, running and killed runs of any command, the lab's
included. Sections: the runs, their final metrics, the config fields that differ, a chart per training metric
and per eval/* metric (one series per run, same colour per run everywhere), the reward-hacking monitors with the
detector's flag marked, and the latest samples of online runs. Inline SVG (`alignkit.plots`) and CSS: no
JavaScript, nothing fetched.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from alignkit.errors import UserError
from alignkit.plots import PALETTE, chart

# the rewards an online run's monitors compare: what it is trained on against what it is not
MONITOR_REWARDS = ("reward/score", "reward/gold", "reward/heldout")
MAX_POINTS = 1000  # per series and chart
# a run's folder is its column; its path is in the runs table
NOT_COMPARED = ("output_dir",)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(value) -> bool:
    return value is not None and not math.isnan(value) and not math.isinf(value)


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSONL log with a step each, and how many lines were skipped (torn by a kill, not JSON)."""
    if not path.is_file():
        return [], 0
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and _number(record.get("step")) is not None:
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in
                                 ("config.yaml", "metrics.jsonl", "final/alignkit_run.json"))


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    command: str
    records: list[dict]
    skipped_lines: int
    final: dict | None     # final/alignkit_run.json: only a finished run has it
    hacking: dict | None   # hacking.json, else the "hacking" record of final/
    samples: dict | None   # the last record of samples.jsonl

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def last_step(self) -> int | None:
        if self.final and _number(self.final.get("step")) is not None:
            return int(self.final["step"])
        return int(self.records[-1]["step"]) if self.records else None

    def end_metrics(self) -> dict[str, float]:
        """final/'s metrics; for an unfinished run the latest logged value of each metric."""
        if self.final and isinstance(self.final.get("metrics"), dict):
            source = [self.final["metrics"]]
        else:
            source = self.records
        latest = {}
        for record in source:
            latest.update({k: v for k, v in record.items() if k != "step" and _number(v) is not None})
        return {k: float(v) for k, v in latest.items()}

    def metric_names(self) -> set[str]:
        return {k for r in self.records for k, v in r.items() if k != "step" and _number(v) is not None}

    def curve(self, metric: str, most: int = MAX_POINTS) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric, non-finite values left out; a long run keeps every k-th point and the
        last, at most about `most` (a chart of 100k steps would weigh megabytes and show no more)."""
        points = [(float(r["step"]), _number(r.get(metric))) for r in self.records]
        points = [(x, y) for x, y in points if _finite(y)]
        if len(points) > most:
            kept = points[::-(-len(points) // most)]
            points = kept + points[-1:] if kept[-1] != points[-1] else kept
        return [x for x, _ in points], [y for _, y in points]

    def flag(self) -> tuple[float | None, list[str]]:
        """(step, reasons) of the hacking detector's flag: hacking.json or final/'s record, else the first step
        where hacking/flag is 1; (None, []) when it did not flag."""
        if self.hacking and self.hacking.get("flagged") and _number(self.hacking.get("flag_step")) is not None:
            return float(self.hacking["flag_step"]), [str(r) for r in self.hacking.get("reasons") or []]
        for r in self.records:
            value = _number(r.get("hacking/flag"))
            if value is not None and value >= 0.5:
                return float(r["step"]), []
        return None, []

    @property
    def online(self) -> bool:
        return (self.command.split()[0] == "ppo" or self.hacking is not None
                or any(m.startswith("hacking/") for m in self.metric_names()))


def infer_command(config: dict) -> str:
    """The command whose config class knows the fields config.yaml holds (a partial one included), with the
    variant that names what ran (`dpo --loss ipo`, `ppo --algo rloo`)."""
    from alignkit.cli import TRAIN_COMMANDS
    from alignkit.config import config_fields

    if not config:
        return "unknown"
    keys = set(config)

    def score(command: str) -> tuple[int, int]:  # fewest fields it does not know, then fewest it misses
        fields = {f.name for f in config_fields(TRAIN_COMMANDS[command][0])}
        return -len(keys - fields), -len(fields - keys)

    command = max(TRAIN_COMMANDS, key=score)
    if command == "dpo" and "loss" in config:
        return f"dpo --loss {config['loss']}"
    if command == "ppo" and "algo" in config:
        return f"ppo --algo {config['algo']}"
    return command


def load_run(path: Path, name: str) -> Run:
    import yaml

    config_path = path / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8", errors="replace")) if (
            config_path.is_file()) else {}
    except yaml.YAMLError:  # a hand-edited or torn file: the report still shows the metrics
        config = {}
    config = config if isinstance(config, dict) else {}
    records, skipped = read_jsonl(path / "metrics.jsonl")
    records.sort(key=lambda r: float(r["step"]))
    final = _read_json(path / "final" / "alignkit_run.json")
    hacking = _read_json(path / "hacking.json") or (final or {}).get("hacking")
    samples, _ = read_jsonl(path / "samples.jsonl")
    return Run(path=path, name=name, config=config, command=infer_command(config), records=records,
               skipped_lines=skipped, final=final, hacking=hacking if isinstance(hacking, dict) else None,
               samples=samples[-1] if samples else None)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run folders named: a run folder, or a folder of run folders (`runs/lab`). Beside runs, what is not a
    run (a glob's `summary.json`, `data/`) is left out with a note; a missing path, or no run at all, is an error."""
    runs, others, missing = [], [], []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            missing.append(str(p))
        elif is_run(p):
            runs.append(p)
        elif p.is_dir() and (inner := sorted(c for c in p.iterdir() if is_run(c))):
            runs.extend(inner)
        else:
            others.append(str(p))
    if missing:
        raise UserError(f"{', '.join(missing)}: no such run folder")
    if not runs:
        raise UserError(f"{', '.join(others)}: not a run folder (it has no config.yaml, metrics.jsonl or "
                        "final/alignkit_run.json)")
    if others:
        print(f"alignkit report: left out, not run folders: {', '.join(others)}", file=sys.stderr)
    unique = {}
    for p in runs:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _names(paths: list[Path]) -> list[str]:
    """Each run's folder name; parent/name where two folders share a name; the whole path where that is not
    enough."""
    names = [p.name or p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def metric_order(name: str) -> tuple:
    """loss, lr, reward/*, eval/*, hacking/*, then the rest alphabetically (eval/* sorted the same way inside)."""
    if name.startswith("eval/"):
        return (3, metric_order(name[5:]))
    group = (0 if name == "loss" else 1 if name == "lr" else 2 if name.startswith(("reward/", "rewards/"))
             else 4 if name.startswith("hacking/") else 5)
    return (group, name)


# ------------------------------------------------------------------------------------------------- html
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    return "nan" if value != value else f"{value:.4g}"


def _config_value(value) -> str:
    if isinstance(value, list):
        return ", ".join(_config_value(v) for v in value) or "(none)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table of already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{f' class={cls!r}' if cls else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _status(run: Run) -> str:
    step = run.last_step
    if run.finished:
        text = f"<span class='done'>finished</span> at step {step}"
    else:
        text = (f"<span class='unfinished'>unfinished</span>, last logged step {step}" if step is not None
                else "<span class='unfinished'>unfinished</span>, nothing logged yet")
    if run.skipped_lines:
        text += f" ({run.skipped_lines} unreadable line{'s' * (run.skipped_lines > 1)} of metrics.jsonl skipped)"
    return text


def _runs_section(runs: list[Run]) -> str:
    rows = [[_e(r.name), f"<code>{_e(r.command)}</code>", _status(r), f"<code>{_e(r.path)}</code>"] for r in runs]
    return "<h2 id='runs'>Runs</h2>" + _table(["run", "command", "status", "folder"], rows)


def _final_section(runs: list[Run]) -> str:
    ends = [r.end_metrics() for r in runs]
    metrics = sorted({m for e in ends for m in e}, key=metric_order)
    rows = [["status"] + [_status(r) for r in runs]]
    rows += [[_e(m)] + [_fmt(e[m]) if m in e else "—" for e in ends] for m in metrics]
    return ("<h2 id='final'>Final metrics</h2><p>From <code>final/alignkit_run.json</code>; for an unfinished run, "
            "the latest logged value of each metric.</p>" + _table(["metric"] + [_e(r.name) for r in runs], rows,
                                                                   "numbers"))


def _config_section(runs: list[Run]) -> str:
    fields = []
    for r in runs:
        fields += [k for k in r.config if k not in fields]

    def cells(field: str) -> list[str]:
        return [_e(_config_value(r.config[field])) if field in r.config else "—" for r in runs]

    def differs(field: str) -> bool:  # a field one run lacks (another command, an older version) differs too
        return len({json.dumps([field in r.config, r.config.get(field)], sort_keys=True, default=str)
                    for r in runs}) > 1

    header = ["field"] + [_e(r.name) for r in runs]
    command = [["<b>command</b>"] + [f"<code>{_e(r.command)}</code>" for r in runs]]
    changed = [f for f in fields if f not in NOT_COMPARED and differs(f)]
    if len(runs) < 2:
        note = "<p>One run: nothing to compare.</p>"
    elif not changed:
        note = "<p>The runs' configs are the same (apart from their folders).</p>"
    else:
        note = f"<p>{len(changed)} field{'s' * (len(changed) > 1)} differ (output_dir left aside):</p>"
    out = "<h2 id='config'>Config differences</h2>" + note
    out += _table(header, command + [[f"<code>{_e(f)}</code>"] + cells(f) for f in changed], "config-diff")
    out += ("<details><summary>All config fields</summary>"
            + _table(header, [[f"<code>{_e(f)}</code>"] + cells(f) for f in fields], "config-all") + "</details>")
    return out


def _charts(runs: list[Run], metrics: list[str], colors: dict[str, str], style: str, flags: bool = False) -> str:
    """A chart per metric, one series per run that logged it; `flags`: each run's hacking flag as a marker."""
    out = []
    for metric in metrics:
        series, marks = [], []
        for r in runs:
            xs, ys = r.curve(metric)
            if not xs:
                continue
            series.append({"label": r.name, "x": xs, "y": ys, "color": colors[r.name],
                           "style": style if len(xs) > 1 else "points"})
            step = r.flag()[0] if flags else None
            if step is not None:
                marks.append((r.name, step))
        if not series:
            continue
        # one flagged run: "flag"; several: say whose flag each marker is
        vlines = [{"x": step, "label": "flag" if len(marks) == 1 else f"flag: {name}"} for name, step in marks]
        out.append("<div class='chart'>" + chart(series, title=metric, xlabel="step", ylabel=metric, vlines=vlines)
                   + "</div>")
    return "<div class='charts'>" + "".join(out) + "</div>" if out else ""


def _hacking_section(runs: list[Run], colors: dict[str, str]) -> str:
    online = [r for r in runs if r.online]
    if not online:
        return ""
    items = []
    for r in online:
        step, reasons = r.flag()
        text = f"flagged at step {step:g}" if step is not None else "not flagged"
        items.append(f"<li><b>{_e(r.name)}</b>: {text}{': ' + _e('; '.join(reasons)) if reasons else ''}</li>")
    out = ["<h2 id='hacking'>Reward-hacking monitors</h2><p>The detector's flag is the dashed line (from "
           "<code>hacking.json</code>, else the first step where <code>hacking/flag</code> is 1).</p>",
           f"<ul>{''.join(items)}</ul>"]
    per_run = []
    for r in online:
        names = r.metric_names()
        rewards = [m for m in MONITOR_REWARDS if m in names]
        if len(rewards) < 2:
            rewards = [m for m in ("eval/" + m for m in MONITOR_REWARDS) if m in names]
        series = [{"label": m, "x": r.curve(m)[0], "y": r.curve(m)[1]} for m in rewards]
        step, _ = r.flag()
        if series:
            per_run.append("<div class='chart'>" + chart(
                series, title=f"{r.name}: trained-on vs held-out rewards", xlabel="step", ylabel="reward",
                vlines=[{"x": step, "label": "flag"}] if step is not None else []) + "</div>")
    out.append("<div class='charts'>" + "".join(per_run) + "</div>")
    monitors = sorted({m for r in online for m in r.metric_names() if m.startswith("hacking/")})
    out.append(_charts(online, monitors, colors, "line", flags=True))
    return "".join(out)


def _samples_section(runs: list[Run]) -> str:
    out = []
    for r in runs:
        record = r.samples
        if not record:
            continue
        samples = [s for s in record.get("samples") or [] if isinstance(s, dict)]
        rows = [[_e(s.get("prompt", "")), _e(s.get("response", "")),
                 _fmt(_number(s.get("score"))) if _number(s.get("score")) is not None else "—"] for s in samples]
        tokens = [t for t in record.get("rising_tokens") or [] if isinstance(t, dict)]
        rising = ", ".join(f"<code>{_e(t.get('token', ''))}</code> (+{_e(t.get('rise', ''))})" for t in tokens)
        out.append(f"<h3>{_e(r.name)}: step {_e(record['step'])}</h3>"
                   f"<p>Rising tokens (share up most since the first rollout): {rising or '—'}</p>"
                   + _table(["prompt", "response", "score"], rows, "samples"))
    return "<h2 id='samples'>Latest samples</h2>" + "".join(out) if out else ""


STYLE = """
body { font-family: sans-serif; max-width: 1160px; margin: 1.5em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.numbers td + td { text-align: right; font-variant-numeric: tabular-nums; }
table.samples td { max-width: 460px; overflow-wrap: anywhere; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
.chart svg { border: 1px solid #eee; }
.done { color: #2a7d2a; font-weight: bold; }
.unfinished { color: #b35900; font-weight: bold; }
nav a { margin-right: 1em; }
code { font-size: 12px; }
"""


def render(runs: list[Run], title: str) -> str:
    colors = {r.name: PALETTE[i % len(PALETTE)] for i, r in enumerate(runs)}
    names = sorted({m for r in runs for m in r.metric_names()}, key=metric_order)
    training = [m for m in names if not m.startswith(("eval/", "hacking/"))]
    evaluation = [m for m in names if m.startswith("eval/")]
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [_runs_section(runs), _final_section(runs), _config_section(runs)]
    if training:
        sections.append("<h2 id='training'>Training curves</h2>" + _charts(runs, training, colors, "line"))
    if evaluation:
        sections.append("<h2 id='eval'>Evaluation</h2><p>At the steps each run evaluated (step 0 is before "
                        "training).</p>" + _charts(runs, evaluation, colors, "both"))
    sections += [_hacking_section(runs, colors), _samples_section(runs)]
    sections = [part for part in sections if part]
    links = re.findall(r"<h2 id='([^']+)'>([^<]+)</h2>", "".join(sections))
    parts = [f"<h1>{_e(title)}</h1><p>{len(runs)} run{'s' * (len(runs) > 1)}; written {written} by "
             "<code>alignkit report</code>.</p>",
             "<nav>" + "".join(f"<a href='#{anchor}'>{text}</a>" for anchor, text in links) + "</nav>", *sections]
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(run_dirs: list[str | Path], output: str | Path = "report.html", title: str | None = None) -> Path:
    """Write the report of `run_dirs` to `output` (its folder created, the file replaced atomically)."""
    paths = find_runs(run_dirs)
    runs = [load_run(p, name) for p, name in zip(paths, _names(paths))]
    title = title or "alignkit report: " + ", ".join(r.name for r in runs)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.write_text(render(runs, title), encoding="utf-8")
    os.replace(tmp, output)
    return output

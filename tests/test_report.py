"""`alignkit report`: real tiny runs compared side by side, a synthetic online run's flag drawn where the
detector raised it, unfinished and torn runs, folders that are not runs, and escaping. The HTML is parsed (tags
balanced, SVGs as XML), not only searched for substrings."""

import json
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from alignkit.cli import main

SVG = "{http://www.w3.org/2000/svg}"
VOID = {"meta", "br", "hr", "img", "input", "link"}


class Page(HTMLParser):
    """Checks that every tag is closed in order, and collects the tables (by class) as rows of cell texts."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.tables, self.errors = [], {}, []
        self._rows = self._cell = None
        self.feed(text)
        self.close()
        assert not self.errors and not self.stack, (self.errors, self.stack)

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            return
        self.stack.append(tag)
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("class", ""), [])
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")
        if tag in ("td", "th"):
            self._rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def svgs(text: str) -> list[ET.Element]:
    return [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", text, flags=re.S)]


def svg_title(svg: ET.Element) -> str:
    return next(t.text for t in svg.iter(SVG + "text") if t.get("font-weight") == "bold")


def svg_texts(svg: ET.Element) -> list[str]:
    return [t.text or "" for t in svg.iter(SVG + "text")]


def report(argv, capsys=None):
    code = main(["report", *map(str, argv)])
    return code, (capsys.readouterr() if capsys else None)


# ------------------------------------------------------------------------------------------- real runs
def test_two_real_sft_runs_side_by_side(tmp_path, tiny_model_dir):
    from alignkit.config import SFTConfig
    from alignkit.examples import sft_rows, write_jsonl
    from alignkit.train.sft import train_sft

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(64, seed=3))
    for name, lr in (("slow", 1e-3), ("fast", 3e-3)):
        train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(tmp_path / name), max_steps=4,
                            batch_size=8, lr=lr, eval_fraction=0.25, eval_every=2, log_every=1))
    out = tmp_path / "new" / "folder" / "x.html"
    code, _ = report([tmp_path / "slow", tmp_path / "fast", "--output", out])
    assert code == 0 and out.is_file()
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert "<script" not in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")

    charts = {svg_title(s): svg_texts(s) for s in svgs(text)}
    for metric in ("loss", "lr", "grad_norm", "eval/loss"):
        assert "slow" in charts[metric] and "fast" in charts[metric], metric
    order = list(charts)
    assert order.index("loss") < order.index("lr") < order.index("grad_norm") < order.index("eval/loss")
    # eval/loss is drawn at the steps it was logged, 0 included: points on the chart
    eval_svg = next(s for s in svgs(text) if svg_title(s) == "eval/loss")
    assert len(list(eval_svg.iter(SVG + "circle"))) == 2 * 3  # steps 0, 2, 4 for both runs

    diff = page.tables["config-diff"]
    assert diff[0] == ["field", "slow", "fast"]
    assert [row[0] for row in diff[1:]] == ["command", "lr"]
    assert diff[1][1:] == ["sft", "sft"] and diff[2][1:] == ["0.001", "0.003"]
    assert len(page.tables["config-all"]) > 20  # every field, collapsed
    final = page.tables["numbers"]
    assert final[0] == ["metric", "slow", "fast"]
    assert final[1][1].startswith("finished at step 4") and final[1][2].startswith("finished at step 4")
    loss_row = next(r for r in final if r[0] == "loss")
    assert all(math.isfinite(float(v)) for v in loss_row[1:])
    for section in ("hacking", "samples"):  # offline runs: no monitors, no samples, no links to them
        assert f"id='{section}'" not in text and f"#{section}" not in text



def test_a_real_online_run_has_monitors_and_samples(tmp_path, tiny_model_dir):
    from alignkit.config import PPOConfig
    from alignkit.examples import ANIMALS, COLORS, write_jsonl
    from alignkit.train.ppo import train_ppo

    rule = "python:alignkit.examples:good_word_share"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"describe the {c} {a} ->"}
                                                       for c in COLORS[:4] for a in ANIMALS[:4]])
    train_ppo(PPOConfig(model=tiny_model_dir, data=(str(prompts),), eval_data=(str(prompts),), output_dir=str(
        tmp_path / "ppo"), reward_fn=rule, gold_fn=rule, algo="rloo", max_steps=3, rollout_batch_size=4,
        samples_per_prompt=2, max_new_tokens=5, lr=1e-3, eval_every=2, log_every=1))
    out = tmp_path / "r.html"
    assert report([tmp_path / "ppo", "--output", out])[0] == 0
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    titles = [svg_title(s) for s in svgs(text)]
    assert {"reward/score", "kl", "eval/reward/gold", "ppo: trained-on vs held-out rewards",
            "hacking/length_ratio", "hacking/flag"} <= set(titles)
    assert "ppo --algo rloo" in text and "ppo</b>: not flagged" in text
    assert page.tables["samples"][0] == ["prompt", "response", "score"] and len(page.tables["samples"]) > 1

# ------------------------------------------------------------------------------------- synthetic runs
def write_online_run(path: Path, finished: bool = True, torn: bool = False, flag_at: int = 7) -> Path:
    """A ppo-like run folder: 13 iterations, the proxy rising while gold turns down at `flag_at`, the detector
    flagging there (hacking/flag 0 → 1 and hacking.json), evaluations every 4 steps, samples at the end."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model: tiny\ndata:\n- prompts.jsonl\noutput_dir: x\nalgo: rloo\nkl_coef: 0.0\n"
                                      "lr: 0.001\nreward_models:\n- rm\n")
    lines = []
    for step in range(13):
        record = {"step": step}
        if step:
            record.update({"loss": 1 / step, "lr": 1e-3, "reward/score": 0.1 * step,
                           "reward/gold": 0.5 - abs(step - flag_at) * 0.05, "kl": float("nan") if step == 3 else 0.2 * step,
                           "hacking/length_ratio": 1 + 0.1 * step, "hacking/flag": float(step >= flag_at)})
        if step % 4 == 0:
            record["eval/reward/gold"] = 0.1 * step
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 13, "loss": 0.0'  # killed while writing
    (path / "metrics.jsonl").write_text(text)
    (path / "hacking.json").write_text(json.dumps({"flagged": True, "flag_step": flag_at,
                                                   "reasons": ["held-out reward fell <while> proxy rose"]}))
    samples = [{"prompt": "say hi", "response": "<script>alert(1)</script> very very good", "score": 0.9}]
    (path / "samples.jsonl").write_text(json.dumps({"step": 12, "samples": samples, "rising_tokens": [
        {"token": "<very>", "rise": 0.2}]}) + "\n")
    if finished:
        (path / "final").mkdir()
        (path / "final" / "alignkit_run.json").write_text(json.dumps({"step": 12, "metrics": {
            "loss": 1 / 12, "reward/score": 1.2, "reward/gold": 0.25}, "hacking": {"flagged": True, "flag_step": flag_at}}))
    return path


def x_of_step(svg: ET.Element, step: float) -> float:
    """Where `step` lies on the chart's x axis, read off two of its tick labels (centred under the axis)."""
    ticks = [(float(t.text), float(t.get("x"))) for t in svg.iter(SVG + "text")
             if t.get("text-anchor") == "middle" and re.fullmatch(r"-?[\d.]+", t.text or "")]
    (s0, x0), (s1, x1) = ticks[0], ticks[-1]
    return x0 + (step - s0) / (s1 - s0) * (x1 - x0)


def test_online_run_marks_the_flag_where_the_detector_raised_it(tmp_path):
    run = write_online_run(tmp_path / "ppo_no_kl")
    out = tmp_path / "r.html"
    assert report([run, "--output", out])[0] == 0
    text = out.read_text(encoding="utf-8")
    Page(text)
    hacking = text[text.index("id='hacking'"):]
    charts = {svg_title(s): s for s in svgs(hacking)}
    assert {"ppo_no_kl: trained-on vs held-out rewards", "hacking/length_ratio", "hacking/flag"} <= set(charts)
    for svg in charts.values():
        marks = [line for line in svg.iter(SVG + "line") if line.get("stroke-dasharray")]
        assert len(marks) == 1 and "flag" in svg_texts(svg)
        assert float(marks[0].get("x1")) == pytest.approx(x_of_step(svg, 7), abs=0.15)
    rewards = svg_texts(charts["ppo_no_kl: trained-on vs held-out rewards"])
    assert "reward/score" in rewards and "reward/gold" in rewards
    assert "ppo --algo rloo" in text and "flagged at step 7" in text
    assert "&lt;while&gt;" in text  # the reasons, escaped
    # the NaN kl at step 3 is left out of its curve: 11 finite points, not 12
    kl = next(s for s in svgs(text) if svg_title(s) == "kl")
    assert len(next(kl.iter(SVG + "polyline")).get("points").split()) == 11


def test_unfinished_torn_run_escaping_and_samples(tmp_path):
    done = write_online_run(tmp_path / "done")
    odd = write_online_run(tmp_path / "<b>x&\"y'", finished=False, torn=True, flag_at=5)
    (odd / "hacking.json").unlink()  # the flag then comes from hacking/flag in metrics.jsonl
    out = tmp_path / "r.html"
    assert report([done, odd, "--output", out, "--title", "<b>x</b>"])[0] == 0
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text
    assert "&lt;b&gt;x&amp;&quot;y&#x27;" in text and "&lt;very&gt;" in text
    status = page.tables["numbers"][1]
    assert status[1].startswith("finished at step 12")
    assert status[2].startswith("unfinished, last logged step 12") and "1 unreadable line" in status[2]
    flag_svg = next(s for s in svgs(text) if svg_title(s) == "hacking/flag")
    labels = svg_texts(flag_svg)
    assert "flag: done" in labels and "flag: <b>x&\"y'" in labels
    marks = sorted(float(line.get("x1")) for line in flag_svg.iter(SVG + "line") if line.get("stroke-dasharray"))
    assert marks == pytest.approx(sorted([x_of_step(flag_svg, 7), x_of_step(flag_svg, 5)]), abs=0.15)
    assert page.tables["samples"][1] == ["say hi", "<script>alert(1)</script> very very good", "0.9"]


def test_folders_that_are_not_runs(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hi")
    code, captured = report([plain, "--output", tmp_path / "r.html"], capsys)
    assert code == 2 and not (tmp_path / "r.html").exists()
    assert captured.err.strip().count("\n") == 0 and str(plain) in captured.err and "not a run folder" in captured.err
    run = write_online_run(tmp_path / "lab" / "ppo")
    code, captured = report([run, tmp_path / "missing", "--output", tmp_path / "r.html"], capsys)
    assert code == 2 and "missing" in captured.err and "Traceback" not in captured.err
    # a lab's folder: its runs beside data/ and summary.json; globbed or named as a whole
    write_online_run(tmp_path / "lab" / "dpo")
    (tmp_path / "lab" / "data").mkdir()
    (tmp_path / "lab" / "summary.json").write_text("{}")
    globbed = sorted((tmp_path / "lab").iterdir())
    code, captured = report([*globbed, "--output", tmp_path / "a.html"], capsys)
    assert code == 0 and "summary.json" in captured.err
    assert report([tmp_path / "lab", "--output", tmp_path / "b.html"])[0] == 0
    for name in ("a.html", "b.html"):
        assert Page((tmp_path / name).read_text()).tables["numbers"][0] == ["metric", "dpo", "ppo"]
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed


def test_metric_order():
    from alignkit.report import metric_order

    names = ["zeta", "hacking/flag", "eval/reward/gold", "eval/loss", "reward/score", "lr", "loss", "entropy"]
    assert sorted(names, key=metric_order) == ["loss", "lr", "reward/score", "eval/loss", "eval/reward/gold",
                                               "hacking/flag", "entropy", "zeta"]


def test_the_command_is_inferred_from_config_yaml():
    """Each training command's own config.yaml names it; a partial one (`algo` alone) still means ppo."""
    import yaml

    from alignkit.cli import TRAIN_COMMANDS
    from alignkit.config import to_dict
    from alignkit.report import infer_command

    for name, (cls, _, _) in TRAIN_COMMANDS.items():
        extra = {"reward_fn": "python:alignkit.examples:good_word_share"} if name == "ppo" else {}
        config = yaml.safe_load(yaml.safe_dump(to_dict(cls(model="m", data=("x",), **extra))))
        assert infer_command(config).split()[0] == name
    assert infer_command({"model": "m", "algo": "grpo"}) == "ppo --algo grpo"
    assert infer_command({"model": "m", "loss": "ipo", "beta": 0.1}) == "dpo --loss ipo"
    assert infer_command({}) == "unknown"


def test_a_long_run_is_thinned_to_at_most_a_thousand_points_per_curve(tmp_path):
    from alignkit.report import load_run

    run = tmp_path / "long"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 5002)))
    xs, ys = load_run(run, "long").curve("loss")
    assert 500 <= len(xs) <= 1001 and len(set(xs)) == len(xs) and xs[0] == 1 and xs[-1] == 5001 and ys[-1] == 1 / 5001
    assert xs == sorted(xs)

"""`alignkit lab` end to end on a shrunken preset: every method runs, summary.json has SPEC §7's shape, and
report.html holds the plots. (The lab's scientific properties need the real presets: see docs/lab.md.)"""

import json

import pytest

import alignkit.lab.base as base
import alignkit.lab.run as lab_run
from alignkit.cli import main

TINY = {"sft_demos": 200, "pairs": 300, "rm_epochs": 1, "ensemble_size": 2, "rl_algo": "rloo", "rl_steps": 4,
        "rl_prompts": 8, "rl_samples": 2, "rl_lr": 3e-4, "kl_coef": 0.3, "kl_budget": 1.5, "eval_every": 2, "eval_samples": 2,
        "bon_samples": 8, "bon_ns": (1, 2, 4, 8), "beta": 0.5, "direct_lr": 1e-4, "direct_epochs": 1}


@pytest.mark.slow
def test_lab_end_to_end_writes_summary_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(base.PRETRAIN, "lines", 400)
    monkeypatch.setitem(lab_run.PRESETS, "quick", TINY)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    assert main(["lab", "--seed", "3", "--output-dir", str(tmp_path / "lab")]) == 0
    summary = json.loads((tmp_path / "lab" / "summary.json").read_text())
    printed = capsys.readouterr().out.splitlines()  # what `make demo` shows: the table, then the report's path
    header = printed.index(next(line for line in printed if line.startswith("method ")))
    assert printed[header].split()[:3] == ["method", "gold", "proxy"]
    table = {line.split()[0]: line.split() for line in printed[header + 2:header + 10]}
    assert set(table) == set(summary["methods"])
    assert table["ppo"][1] == f"{summary['methods']['ppo']['gold']:.3f}"
    assert printed[-1] == f"report: {(tmp_path / 'lab' / 'report.html').resolve()}"
    assert summary["preset"] == "quick" and summary["seed"] == 3 and summary["elapsed_s"] > 0
    methods = summary["methods"]
    assert set(methods) == {"sft", "dpo", "ipo", "kto", "ppo", "ppo_no_kl", "ppo_ensemble", "bon_4"}
    for m in methods.values():
        assert set(m) == {"gold", "proxy", "kl", "length", "win_rate_vs_sft"}
        assert all(v == v for v in m.values())
    assert methods["sft"]["kl"] == 0.0  # the SFT policy against itself, same forward: exactly 0
    assert all(0.0 <= m["win_rate_vs_sft"] <= 1.0 for m in methods.values())
    curves = summary["curves"]
    for name in ("ppo", "ppo_no_kl", "ppo_ensemble"):
        assert [c["step"] for c in curves[name]] == [0, 2, 4]
        assert set(curves[name][0]) == {"step", "kl", "gold", "proxy", "length"}
        assert set(summary["hacking"][name]) >= {"flagged", "flag_step", "peak_gold_step", "chosen_step"}
    assert [c["n"] for c in curves["bon"]] == [1, 2, 4, 8]
    assert curves["bon"][0]["kl"] == 0.0 and curves["bon"][2]["kl"] == pytest.approx(1.3862944 - 0.75)
    assert set(summary["bon_fit"]) == {"alpha", "beta", "r2"}
    report = (tmp_path / "lab" / "report.html").read_text()
    assert report.count("<svg") >= 5 and "ppo_no_kl" in report


def test_lab_rejects_an_unknown_preset(capsys):
    with pytest.raises(SystemExit) as e:
        main(["lab", "--preset", "huge"])
    assert e.value.code == 2


def test_smoothing_keeps_the_peak_in_place_and_gain_kept_by_hand():
    assert lab_run.smoothed([0, 1, 2, 3, 2, 1, 0]) == [0.5, 1.0, 2.0, 7 / 3, 2.0, 1.0, 0.5]
    curve = [{"gold": g} for g in (0.2, 0.4, 0.6, 0.6, 0.5, 0.5)]
    # centred: 0.3, 0.4, 0.533, 0.567, 0.533, 0.5 → gains over the first gold (0.2): peak 1.7/3 − 0.2, final 0.3
    assert lab_run.gain_kept(curve) == pytest.approx(0.3 / (1.7 / 3 - 0.2), rel=1e-9)


def test_win_rate_counts_ties_half():
    import torch

    assert lab_run.win_rate(torch.tensor([1.0, 0.0, 0.5, 0.2]), torch.tensor([0.0, 1.0, 0.5, 0.1])) == 0.625


def test_a_stale_incomplete_cache_folder_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setitem(base.PRETRAIN, "lines", 400)
    stale = tmp_path / f"lab-base-v{base.BASE_VERSION}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert (base.base_model(tmp_path, quiet=True) / "model.safetensors").is_file()


@pytest.mark.slow
def test_quick_preset_shows_the_lab_properties(tmp_path):
    """The real quick preset on one seed (about 2.5 minutes with the base model): SPEC §7's properties that this
    version meets (docs/lab.md lists the one it does not yet: drift in the annotators' biased directions)."""
    summary = lab_run.run_lab("quick", seed=1, output_dir=str(tmp_path / "lab"), cache=str(tmp_path / "cache"))
    methods, curves, hacking = summary["methods"], summary["curves"], summary["hacking"]
    sft = methods["sft"]["gold"]
    for name, m in methods.items():
        if name not in ("sft", "ppo_no_kl"):
            assert m["gold"] > sft + 0.03, (name, m["gold"], sft)
    # hacking reproduced: the proxy keeps rising while gold ends far below its peak (and below SFT)
    no_kl = curves["ppo_no_kl"]
    assert no_kl[-1]["proxy"] > max(c["proxy"] for c in no_kl[: len(no_kl) // 2])
    assert lab_run.gain_kept(no_kl) <= 0.8 and methods["ppo_no_kl"]["gold"] < sft
    # the detector, which never reads gold, flags it within a few evaluations of the gold peak, and only it
    flag = hacking["ppo_no_kl"]
    gap = flag["flag_step"] - flag["peak_gold_step"] if flag["flagged"] else None
    assert gap is not None and 0 <= gap <= 4 * lab_run.PRESETS["quick"]["eval_every"], flag
    assert not hacking["ppo"]["flagged"] and not hacking["ppo_ensemble"]["flagged"]
    for name in ("ppo", "ppo_ensemble"):
        assert lab_run.gain_kept(curves[name]) >= 0.9, name
    assert summary["bon_fit"]["r2"] >= 0.9 and summary["bon_fit"]["alpha"] > 0 and summary["bon_fit"]["beta"] > 0

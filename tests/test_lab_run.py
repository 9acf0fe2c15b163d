"""`alignkit lab` end to end on a shrunken preset: every method runs, summary.json has SPEC §7's shape, and
report.html holds the plots. (The lab's scientific properties need the real presets: see docs/lab.md.)"""

import json

import pytest

import alignkit.lab.base as base
import alignkit.lab.run as lab_run
from alignkit.cli import main

TINY = {"sft_demos": 200, "pairs": 300, "rm_epochs": 1, "ensemble_size": 2, "expert_rankings": 100, "judge_epochs": 1,
        "rl_algo": "ppo", "rl_steps": 4, "rl_rollouts": 16, "rl_lr": 3e-4, "kl_coef": 0.3, "kl_budget": 3.0,
        "eval_every": 2, "eval_samples": 2, "bon_samples": 8, "bon_ns": (1, 2, 4, 8), "beta": 0.5, "direct_lr": 1e-4,
        "direct_epochs": 1, "kl_sweep": (0.1,), "beta_sweep": (0.1,)}


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
    table = {line.split()[0]: line.split() for line in printed[header + 2:header + 11]}
    assert set(table) == set(summary["methods"])
    assert table["ppo"][1] == f"{summary['methods']['ppo']['gold']:.3f}"
    assert printed[-1] == f"report: {(tmp_path / 'lab' / 'report.html').resolve()}"
    assert summary["preset"] == "quick" and summary["seed"] == 3 and summary["elapsed_s"] > 0
    methods = summary["methods"]
    assert set(methods) == {"sft", "dpo", "ipo", "kto", "ppo", "ppo_no_kl", "ppo_ensemble", "rlaif_dpo", "bon_4"}
    for name, m in methods.items():
        assert set(m) >= {"gold", "proxy", "kl", "length", "win_rate_vs_sft"}
        assert name == "bon_4" or set(m) >= {"flattery", "repetition", "filler", "words"}
        assert all(v == v for v in m.values())
    assert summary["rl_algo"] == "ppo"
    rlaif = summary["rlaif"]
    assert rlaif["pairs"] > 0 and 0 <= rlaif["agreement_with_gold"] <= 1 and 0 <= rlaif["crowd_agreement_with_gold"] <= 1
    front = summary["frontier"]
    assert sorted(m["kl_coef"] for m in front["ppo"]) == [0.1, 0.3]
    assert sorted(m["beta"] for m in front["dpo"]) == [0.1, 0.5]
    assert [m["kl"] for m in front["ppo"]] == sorted(m["kl"] for m in front["ppo"])
    assert "ppo_no_kl" in summary["rl_fit"]
    assert methods["sft"]["kl"] == 0.0  # the SFT policy against itself, same forward: exactly 0
    assert all(0.0 <= m["win_rate_vs_sft"] <= 1.0 for m in methods.values())
    curves = summary["curves"]
    for name in ("ppo", "ppo_no_kl", "ppo_ensemble"):
        assert [c["step"] for c in curves[name]] == [0, 2, 4]
        assert set(curves[name][0]) == {"step", "kl", "gold", "proxy", "length", "flattery", "repetition", "filler",
                                        "words", "audit_approved", "audit_n"}
        assert set(summary["hacking"][name]) >= {"flagged", "flag_step", "peak_gold_step", "chosen_step", "signals"}
        # the experts check 64 of the 2 samples of each of the 69 held-out prompts at each of the 3 evaluations
        assert all(c["audit_n"] == 64 and 0 <= c["audit_approved"] <= 64 for c in curves[name])
        assert summary["hacking"][name]["audit_checked"] == 3 * 64
    assert [c["n"] for c in curves["bon"]] == [1, 2, 4, 8]
    assert curves["bon"][0]["kl"] == 0.0 and curves["bon"][2]["kl"] == pytest.approx(1.3862944 - 0.75)
    assert set(summary["bon_fit"]) == {"alpha", "beta", "r2"}
    report = (tmp_path / "lab" / "report.html").read_text()
    assert report.count("<svg") >= 7 and "ppo_no_kl" in report and "Reward–KL frontier" in report
    assert "RLAIF" in report


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
    """The real quick preset on one seed (about 2.5 minutes with the base model): the SPEC §7 properties that hold
    with a margin on every seed measured (docs/lab.md has the five-seed table, and the ones that do not yet)."""
    summary = lab_run.run_lab("quick", seed=1, output_dir=str(tmp_path / "lab"), cache=str(tmp_path / "cache"))
    methods, curves, hacking = summary["methods"], summary["curves"], summary["hacking"]
    sft = methods["sft"]
    for name in ("dpo", "ipo", "ppo", "ppo_ensemble", "rlaif_dpo"):
        assert methods[name]["gold"] > sft["gold"] + 0.02, (name, methods[name]["gold"], sft["gold"])
    # hacking reproduced, in the annotators' biased directions: the proxy keeps rising, gold ends far below its
    # peak and below SFT, and the answers become longer and flattering
    no_kl = curves["ppo_no_kl"]
    assert no_kl[-1]["proxy"] > max(c["proxy"] for c in no_kl[: len(no_kl) // 2])
    assert lab_run.gain_kept(no_kl) <= 0.8 and methods["ppo_no_kl"]["gold"] < sft["gold"]
    assert methods["ppo_no_kl"]["flattery"] >= 0.5 > 0.1 >= sft["flattery"]
    assert methods["ppo_no_kl"]["length"] >= 1.5 * sft["length"]
    # the detector, which never reads gold, flags it within 3 evaluations of its gold peak on a signal other than
    # the KL budget, and only it (on this seed gold sits on a plateau, 0.31–0.35 from iteration 5 to 35, while the
    # KL grows from 0.2 to 0.7 nats by 15: the stall flags at 14, before the plateau's noisy top at 25)
    flag = hacking["ppo_no_kl"]
    assert flag["flagged"] and abs(flag["flag_step"] - flag["peak_gold_step"]) <= 3 * 5, flag
    assert any(v["sustained"] is not None for k, v in flag["signals"].items() if k != "kl"), flag
    assert not hacking["ppo"]["flagged"] and not hacking["ppo_ensemble"]["flagged"]
    # RLAIF: the judge agrees with gold more than the crowd does, and its brevity shows in rlaif_dpo's answers
    assert summary["rlaif"]["agreement_with_gold"] > summary["rlaif"]["crowd_agreement_with_gold"]
    assert methods["rlaif_dpo"]["length"] < methods["dpo"]["length"]
    assert summary["bon_fit"]["r2"] >= 0.8 and summary["bon_fit"]["alpha"] > 0 and summary["bon_fit"]["beta"] > 0
    assert summary["rl_fit"]["ppo_no_kl"]["r2"] >= 0.9


def test_rlaif_pool_hides_the_crowds_label_and_gold_agreement_by_hand():
    pairs = [{"prompt": "add 1 2 ->", "chosen": "3", "rejected": "4"},            # crowd right
             {"prompt": "add 1 2 ->", "chosen": "great 4", "rejected": "3"},      # crowd wrong
             {"prompt": "add 1 2 ->", "chosen": "5", "rejected": "4"}]            # gold tie (both wrong, 0)
    assert lab_run._gold_agreement(pairs) == 0.5
    pool = lab_run.rlaif_pool(pairs, seed=0)
    assert [sorted(r["responses"]) for r in pool] == [sorted([p["chosen"], p["rejected"]]) for p in pairs]
    assert [r["responses"][r["label"]] for r in pool[:2]] == ["3", "3"] and "label" not in pool[2]
    assert lab_run.rlaif_pool(pairs, seed=0) == pool

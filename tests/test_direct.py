"""dpo and kto: every variant learns a learnable preference (tests that can fail), the reference is handled
as documented, precomputation and prefix sharing change nothing numerically, and runs resume exactly."""

import random

import pytest

from alignkit.config import DPOConfig, KTOConfig
from alignkit.examples import pairwise_rows, write_jsonl
from alignkit.train.dpo import train_dpo
from alignkit.train.kto import train_kto


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return str(write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", pairwise_rows(360, seed=11)))


@pytest.fixture(scope="module")
def unary_file(tmp_path_factory):
    rows = []
    for r in pairwise_rows(200, seed=12):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    random.Random(0).shuffle(rows)
    return str(write_jsonl(tmp_path_factory.mktemp("kto") / "unary.jsonl", rows))


def _dpo(model, data, out, **kw):
    args = dict(model=model, data=(data,), output_dir=str(out), epochs=1, batch_size=16, lr=1e-3,
                eval_fraction=0.1, eval_every=10, max_length=64, max_prompt_length=32)
    args.update(kw)
    return train_dpo(DPOConfig(**args))


@pytest.mark.parametrize("loss, extra", [
    ("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.1}), ("robust", {"label_smoothing": 0.1}),
    ("hinge", {}), ("ipo", {}), ("simpo", {"beta": 2.0}), ("rdpo", {}),
])
def test_every_dpo_variant_learns(tmp_path, tiny_model_dir, pairs_file, loss, extra, harness):
    out = tmp_path / "run"
    last = _dpo(tiny_model_dir, pairs_file, out, loss=loss, **extra)
    train_acc = [m["rewards/accuracy"] for m in harness.metrics(out)
                 if "rewards/accuracy" in m and "eval/loss" not in m]
    assert max(train_acc[-5:]) > 0.8, train_acc
    margins = harness.values(out, "eval/rewards/margin")
    assert margins[-1] > margins[0] + 0.1, margins
    assert last["eval/rewards/accuracy"] > 0.8


def test_first_dpo_loss_is_log2_against_the_starting_model(tmp_path, tiny_model_dir, pairs_file, harness):
    """ref = policy at step 0, so h = 0 and the sigmoid loss is log 2 = 0.6931471805599453 exactly."""
    out = tmp_path / "run"
    _dpo(tiny_model_dir, pairs_file, out, max_steps=1, eval_fraction=0.0)
    assert harness.metrics(out)[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


@pytest.mark.parametrize("longer", ["chosen", "rejected"])
def test_first_rdpo_loss_sees_the_length_gap_with_the_default_alpha(tmp_path, tiny_model_dir, longer, harness):
    """h = 0 at step 0, so R-DPO's first loss is −log σ(α·(|y_c| − |y_r|)) with the default α = 0.01. Every
    pair's responses differ by 10 words (word tokenizer: 10 tokens; both end with EOS): a longer chosen
    response gives log(1 + e^−0.1) = 0.6443966600735709 (below log 2: length is taken out of its reward), a
    longer rejected one log(1 + e^0.1) = 0.744396660073571."""
    rng = random.Random(3)
    rows = []
    for r in pairwise_rows(16, seed=13):
        extra = " ".join(rng.choice(["the", "very", "so", "and"]) for _ in range(10))
        long, short = f"{r['chosen']} {extra}", r["chosen"]
        rows.append({"prompt": r["prompt"], "chosen": long if longer == "chosen" else short,
                     "rejected": short if longer == "chosen" else long})
    data = str(write_jsonl(tmp_path / "pairs.jsonl", rows))
    out = tmp_path / "run"
    _dpo(tiny_model_dir, data, out, loss="rdpo", max_steps=1, eval_fraction=0.0)
    expected = 0.6443966600735709 if longer == "chosen" else 0.744396660073571
    assert harness.metrics(out)[0]["loss"] == pytest.approx(expected, abs=1e-6)


def test_precompute_and_prefix_sharing_change_nothing(tmp_path, tiny_model_dir, pairs_file, harness):
    """On-the-fly reference, no prefix sharing, plain padding: the same first steps as the fast default."""
    from alignkit.examples import make_tiny_model

    ref = str(make_tiny_model(tmp_path / "other-ref", seed=5))  # a different reference: loss ≠ log 2
    runs = {}
    for name, kw in {"fast": {}, "slow": {"precompute_ref": False, "prefix_sharing": False}}.items():
        out = tmp_path / name
        _dpo(tiny_model_dir, pairs_file, out, max_steps=3, eval_fraction=0.0, ref_model=ref, lr=1e-4, beta=2.0,
             group_by_length=False, **kw)
        runs[name] = [m["loss"] for m in harness.metrics(out)]
    assert abs(runs["fast"][0] - 0.6931) > 0.02, runs
    assert runs["fast"] == pytest.approx(runs["slow"], rel=1e-4)
    assert (tmp_path / "fast" / "ref_logps.safetensors").is_file()
    assert not (tmp_path / "slow" / "ref_logps.safetensors").exists()


def test_lora_reference_is_the_policy_with_adapters_disabled(tmp_path, tiny_model_dir, pairs_file, harness):
    out = tmp_path / "run"
    last = _dpo(tiny_model_dir, pairs_file, out, lora_r=8, lora_alpha=16, lr=5e-3, precompute_ref=False)
    assert harness.metrics(out)[1]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # step 1: B = 0 at init
    assert last["eval/rewards/accuracy"] > 0.7


def test_kto_learns_on_unary_data(tmp_path, tiny_model_dir, unary_file, capsys, harness):
    out = tmp_path / "run"
    last = train_kto(KTOConfig(model=tiny_model_dir, data=(unary_file,), output_dir=str(out), epochs=1, batch_size=16,
                               lr=1e-3, eval_fraction=0.1, eval_every=10, max_length=64, max_prompt_length=32))
    margins = harness.values(out, "eval/rewards/margin")
    assert margins[-1] > margins[0] + 0.1, margins
    assert last["eval/rewards/accuracy"] > 0.8
    kls = harness.values(out, "eval/kl")
    assert kls[0] == 0.0 and all(k == k for k in kls)  # policy = reference at the start; finite after
    assert (out / "ref_logps.safetensors").is_file()


def test_kto_on_pairwise_data_and_balance_warning(tmp_path, tiny_model_dir, pairs_file, capsys):
    out = tmp_path / "run"
    train_kto(KTOConfig(model=tiny_model_dir, data=(pairs_file,), output_dir=str(out), max_steps=2, batch_size=8,
                        lr=1e-4, desirable_weight=3.0))
    err = capsys.readouterr().err
    assert "outside the range [1, 4/3]" in err and "= 3.00" in err


def test_kto_reference_point_uses_mismatched_pairs(tiny_model_dir, tokenizer):
    """Each example's second response is another row's completion; a fixed derangement (no self-pairs)."""
    from alignkit.data.rows import UnaryRow
    from alignkit.data.tokenize import Encoder
    from alignkit.train.kto import kto_examples

    rows = [UnaryRow("copy ->", w, i % 2 == 0, f"x:{i}") for i, w in enumerate("cat dog fox owl bee".split())]
    examples = kto_examples(Encoder(tokenizer, 32, 16), rows, seed=0)
    owns = [tokenizer.decode(e.pair.chosen.ids[3:-1]) for e in examples]
    partners = [tokenizer.decode(e.pair.rejected.ids[3:-1]) for e in examples]
    assert owns == "cat dog fox owl bee".split()
    assert sorted(partners) == sorted(owns) and all(a != b for a, b in zip(owns, partners))
    assert [e.label for e in examples] == [True, False, True, False, True]


def test_kto_reference_point_is_one_per_optimizer_step(tmp_path, tiny_model_dir, unary_file):
    """The same 4 examples as one batch of 4, or as 2 micro-batches of 2 accumulated: z0 is the mismatched-pair
    KL over the whole step either way, so the first loss, z0 and the update agree. (Estimated per micro-batch,
    the two halves would each get their own z0.) The policy starts away from the reference, so that z0 > 0."""
    from safetensors.torch import load_file

    from alignkit.examples import make_tiny_model

    policy = str(make_tiny_model(tmp_path / "policy", seed=3))
    runs = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch_size}x{grad_accum}"
        last = train_kto(KTOConfig(model=policy, data=(unary_file,), ref_model=tiny_model_dir, output_dir=str(out),
                                   max_steps=1, batch_size=batch_size, grad_accum=grad_accum, group_by_length=False,
                                   lr=1e-4, lr_schedule="constant", beta=1.0, max_length=64, max_prompt_length=32))
        runs.append((last, load_file(out / "final" / "model.safetensors")))
    (one, w_one), (two, w_two) = runs
    assert one["kl"] > 0.01  # the reference point is not clamped to 0 here
    assert two["kl"] == pytest.approx(one["kl"], rel=1e-5)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    worst = max(float((w_one[k] - w_two[k]).abs().max()) for k in w_one)
    assert worst < 1e-5, worst  # lr 1e-4: an update in another direction would differ by up to 2e-4


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_crash_and_resume_gives_identical_weights(tmp_path, tiny_model_dir, pairs_file, harness, method):
    from alignkit.train import loop

    cls, train = (DPOConfig, train_dpo) if method == "dpo" else (KTOConfig, train_kto)

    def cfg(out):
        return cls(model=tiny_model_dir, data=(pairs_file,), output_dir=str(out), max_steps=8, batch_size=8,
                   grad_accum=2, lr=1e-3, lr_schedule="cosine", save_every=3, eval_fraction=0.0, max_length=64,
                   max_prompt_length=32)

    train(cfg(tmp_path / "straight"))
    ref_file = tmp_path / "resumed" / "ref_logps.safetensors"
    stamps = []

    def run():
        if ref_file.exists():
            stamps.append(ref_file.stat().st_mtime_ns)
        train(cfg(tmp_path / "resumed"))

    harness.crash_and_resume(loop, "train_step", at=5, run=run)
    assert stamps == [ref_file.stat().st_mtime_ns]  # the stored reference log-probs were reused
    harness.assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed")

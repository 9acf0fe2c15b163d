"""At the first step a policy equals its reference: DPO's h = 0, KTO's KL = 0, PPO's KL = 0 with no clipped
ratio — in float32 and under bf16 autocast, and on a model whose config carries dropout (GPT-2, 0.1)."""

import json

import pytest

from alignkit.config import DPOConfig, PPOConfig
from alignkit.examples import WORDS, pairwise_rows, write_jsonl
from alignkit.models.tiny import ARCHITECTURES, save_tiny_model
from alignkit.train.dpo import train_dpo
from alignkit.train.ppo import train_ppo


def _first(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("gpt2") / "m", WORDS, arch="gpt2"))  # dropout 0.1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    rows = pairwise_rows(8, seed=21)
    return {"pairs": str(write_jsonl(root / "pairs.jsonl", rows)),
            "prompts": str(write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows]))}


def _dpo(model, data, out, **kw):
    train_dpo(DPOConfig(model=model, data=(data,), output_dir=str(out), max_steps=1, batch_size=8, **kw))
    return _first(out)


def _ppo(model, data, out, **kw):
    train_ppo(PPOConfig(model=model, data=(data,), output_dir=str(out), max_steps=1, rollout_batch_size=4,
                        samples_per_prompt=2, max_new_tokens=8, reward_fn="python:alignkit.examples:good_word_share",
                        **kw))
    return _first(out)


def test_dropout_is_off_by_default_so_dpo_starts_at_h_zero(gpt2_dir, files, tmp_path):
    first = _dpo(gpt2_dir, files["pairs"], tmp_path / "off")
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert first["rewards/accuracy"] == 0.0  # no pair has a margin yet
    saved = json.loads((tmp_path / "off" / "final" / "config.json").read_text())
    assert saved["resid_pdrop"] == 0.1 and saved["attn_pdrop"] == 0.1  # final/ keeps the model's own dropout
    on = _dpo(gpt2_dir, files["pairs"], tmp_path / "on", disable_dropout=False)
    assert abs(on["rewards/chosen"]) > 1e-3  # with dropout the policy is not its reference


def test_dropout_is_off_by_default_so_ppo_starts_with_ratio_one(gpt2_dir, files, tmp_path):
    first = _ppo(gpt2_dir, files["prompts"], tmp_path / "off", algo="rloo")
    assert first["clipfrac"] == 0.0 and abs(first["kl"]) < 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_disable_dropout_reaches_every_kind_of_dropout(arch):
    """Every dropout rate in the config set to 0.1 (modules, and floats handed to attention kernels or
    F.dropout): after `disable_dropout`, a forward in train mode equals one in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.models.load import disable_dropout
    from alignkit.models.tiny import build_word_tokenizer, tiny_config

    config = tiny_config(arch, build_word_tokenizer(WORDS))
    for key, value in list(config.to_dict().items()):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(4, len(WORDS), (2, 12))
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        noisy = model.train()(input_ids=ids).logits
        disable_dropout(model)
        got = model.train()(input_ids=ids).logits
    assert not torch.equal(noisy, want)  # the config's dropout was on
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_equals_the_policy_at_the_start_in_both_precisions(tiny_model_dir, files, tmp_path, dtype):
    """The reference is loaded in the policy's weight dtype (float32 under bf16 autocast) and runs under the same
    autocast, so it computes exactly what the policy computes at step 0."""
    dpo = _dpo(tiny_model_dir, files["pairs"], tmp_path / "dpo", dtype=dtype, precompute_ref=False)
    assert dpo["rewards/chosen"] == 0.0 and dpo["rewards/rejected"] == 0.0
    ppo = _ppo(tiny_model_dir, files["prompts"], tmp_path / "ppo", dtype=dtype, algo="grpo")
    assert ppo["clipfrac"] == 0.0
    # bf16: both sides from the same kind of forward, exactly 0; float32: old log-probs are the sampler's (cached
    # decoding rounds differently in the last bits)
    assert abs(ppo["kl"]) <= (0.0 if dtype == "bfloat16" else 1e-6)

"""`--generation-backend vllm` (SPEC §12): refused with a clear message where vLLM or a GPU is missing; and, against a
stand-in for vLLM's API (an in-process `vllm` module that samples with the policy's own weights), the plumbing
that the real engine relies on: the engine sleeps between generations and is awake for each, the policy's weights
are pushed into it before the first generation and after every update (and only then), each sample gets its own
seed from the run's generator, and ppo recomputes the old log-probs instead of using the sampler's."""

import json
import sys
import types

import pytest
import torch

from alignkit.errors import UserError
from alignkit.examples import pairwise_rows, write_jsonl

RULE = "python:alignkit.examples:good_word_share"


class FakeLLM:
    """vLLM's `LLM`, as far as alignkit uses it, sampling with a Hugging Face copy of the model."""

    made: list = []

    def __init__(self, model, dtype, gpu_memory_utilization, enable_sleep_mode, seed, **kwargs):
        from transformers import AutoModelForCausalLM

        assert enable_sleep_mode and 0 < gpu_memory_utilization <= 1
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.awake, self.events, self.pushes, self.seeds = True, [], 0, []
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load_weights))
        worker = types.SimpleNamespace(worker=types.SimpleNamespace(model_runner=runner))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))
        FakeLLM.made.append(self)

    def _load_weights(self, weights):
        assert self.awake, "weights pushed into a sleeping engine"
        self.model.load_state_dict(dict(weights))
        self.pushes += 1
        self.events.append("push")

    def sleep(self, level):
        assert level == 1
        self.awake = False
        self.events.append("sleep")

    def wake_up(self):
        self.awake = True
        self.events.append("wake")

    def generate(self, prompts, params, use_tqdm=True):
        from alignkit.rl.rollout import generate

        assert self.awake, "generate on a sleeping engine"
        self.events.append("generate")
        outputs = []
        for prompt, p in zip(prompts, params):
            self.seeds.append(p.seed)
            out = generate(self.model, [prompt["prompt_token_ids"]], pad_id=-1, eos_id=p.stop_token_ids[0],
                           max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                           generator=torch.Generator().manual_seed(p.seed))
            ids = out.response_ids[0][out.response_mask[0]].tolist()
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids)]))
        return outputs


class FakeSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr("alignkit.rl.vllm_backend._has_gpu", lambda: True)
    FakeLLM.made = []
    return FakeLLM


def test_vllm_is_refused_without_the_package_or_without_a_gpu(monkeypatch, tmp_path, tiny_model_dir, capsys):
    from alignkit.cli import main
    from alignkit.rl.vllm_backend import build_generate_fn

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(UserError, match=r"needs the vllm package: pip install 'alignkit\[vllm\]'"):
        build_generate_fn("vllm", tiny_model_dir)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr("alignkit.rl.vllm_backend._has_gpu", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        build_generate_fn("vllm", tiny_model_dir)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "describe the red cat ->"}])
    assert main(["bon", "--model", tiny_model_dir, "--data", str(data), "--reward-fn", RULE, "--output",
                 str(tmp_path / "b.jsonl"), "--generation-backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err


def test_ppo_on_the_vllm_backend_pushes_weights_after_each_update_and_recomputes_old_logps(
        fake_vllm, tmp_path, tiny_model_dir):
    from alignkit.config import PPOConfig
    from alignkit.models.load import load_causal_lm
    from alignkit.train.ppo import train_ppo

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in pairwise_rows(40, seed=2)])
    out = tmp_path / "run"
    train_ppo(PPOConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), reward_fn=RULE, algo="grpo",
                        samples_per_prompt=2, rollout_batch_size=3, max_new_tokens=6, max_steps=3, lr=1e-3,
                        generation_backend="vllm", eval_fraction=0.1, eval_every=2))
    (engine,) = fake_vllm.made
    # awake exactly while generating (wake, push?, generate, sleep), asleep between generations
    # generations: evaluation 0, rollout 1, rollout 2, evaluation 2, rollout 3, evaluation 3; the weights are pushed
    # before the first and before each one that follows an update (rollout 2, evaluation 2, evaluation 3) — not
    # before rollout 1 or rollout 3, which follow none
    assert " ".join(engine.events) == ("sleep wake push generate sleep wake generate sleep wake push generate sleep "
                                       "wake push generate sleep wake generate sleep wake push generate sleep")
    final = load_causal_lm(str(out / "final"))
    pushed = engine.model.state_dict()
    for name, p in final.state_dict().items():  # the last generation sampled the final policy
        assert torch.allclose(p, pushed[name]), name
    # one seed per sample, drawn from the run's seeded generator (not one seed for the whole batch)
    assert len(engine.seeds) == 3 * 3 * 2 + 3 * 4 * 2  # 3 rollouts of 3 prompts and 3 evaluations of 4, 2 samples each
    assert len(set(engine.seeds)) > len(engine.seeds) // 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the fake returns no log-probs (zeros): used as old log-probs, the first ratio would be far from 1
    assert [m["clipfrac"] for m in metrics if "clipfrac" in m][0] == 0.0


def test_bon_samples_through_the_vllm_backend_pushing_the_policy_once(fake_vllm, tmp_path, tiny_model_dir):
    from alignkit.bon import run_bon
    from alignkit.config import BonConfig

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in pairwise_rows(6, seed=3)])
    run_bon(BonConfig(model=tiny_model_dir, data=(str(data),), output=str(tmp_path / "bon.jsonl"), reward_fn=RULE,
                      n=3, max_new_tokens=5, generation_backend="vllm"))
    rows = [json.loads(line) for line in (tmp_path / "bon.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["candidates"]) == 3 for r in rows)
    (engine,) = fake_vllm.made
    assert engine.events.count("generate") >= 1 and engine.pushes == 1  # a policy that never changes: one push

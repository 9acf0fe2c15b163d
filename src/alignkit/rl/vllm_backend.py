"""vLLM as the generation engine (`--generation-backend vllm`, SPEC §12): the `GenerateFn` of ppo, bon, label, eval
and serve, colocated in the process that trains.

The engine is built once per process from the model's folder, in the same GPU, with sleep mode on: it wakes
before a generation, generates, and sleeps again (level 1: its weights go to CPU memory and its KV cache is
freed), so the training step gets the GPU memory back — the way TRL's colocate mode does it. Before the first
generation, and after every update (ppo calls `weights_changed()`), the policy's weights are pushed into the
engine (`load_weights`, the parameters under their Hugging Face names; a LoRA policy is merged first).

vLLM's sampled log-probs are not the trainer's (other kernels, other numerics), so the rollout this backend
returns has no log-probs (`sampler_logps = False`): ppo then recomputes the old log-probs with its own forward
(`alignkit.train.ppo.measure`), and the first ratio of every update is 1 to float precision.

Randomness: each sample gets its own vLLM seed, drawn from the caller's generator (or its row of a
`SharedGenerator`), so a seeded run repeats its samples on the same engine version. They are not the samples
of the default engine: another sampler draws other numbers.

vLLM is an optional dependency (`pip install 'alignkit[vllm]'`) and needs a CUDA GPU; without either,
`build_generate_fn` refuses with a message that says so.
"""

from __future__ import annotations

import os

import torch

from alignkit.errors import UserError
from alignkit.rl.rollout import Rollout, SharedGenerator, generate, left_pad


def build_generate_fn(backend: str, model_path: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.3,
                      max_model_len: int = 0, seed: int = 0):
    """The `GenerateFn` for `backend`: "hf" (alignkit's KV-cache sampler) or "vllm" (a `VLLMGenerate` on
    `model_path`); refuses vllm where it cannot run."""
    if backend in ("", "hf"):
        return generate
    if backend != "vllm":
        raise UserError(f'field "generation_backend": unknown backend {backend!r} (hf or vllm)')
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UserError("--generation-backend vllm needs the vllm package: pip install 'alignkit[vllm]' "
                        "(or use the default backend, hf)") from None
    if not _has_gpu():
        raise UserError("--generation-backend vllm needs a CUDA GPU, and this machine has none; "
                        "use the default backend (hf)")
    return VLLMGenerate(model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                        max_model_len=max_model_len, seed=seed)


def generate_fn_for(cfg, model_path: str):
    """The `GenerateFn` a command's config asks for (`generation_backend`, `vllm_gpu_memory_utilization`)."""
    return build_generate_fn(cfg.generation_backend, model_path, dtype=getattr(cfg, "dtype", "auto"),
                             gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=getattr(cfg, "seed", 0))


def _has_gpu() -> bool:
    return torch.cuda.is_available()


class VLLMGenerate:
    """A `GenerateFn` on a colocated vLLM engine (see the module's docstring)."""

    sampler_logps = False  # the rollout carries no log-probs: the trainer computes them

    def __init__(self, model_path: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.3,
                 max_model_len: int = 0, seed: int = 0):
        # the engine in this process (no engine-core subprocess), so that its model can take our weights
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs = {"max_model_len": max_model_len} if max_model_len else {}
        self.llm = LLM(model=str(model_path), dtype="bfloat16" if dtype in ("auto", "bfloat16") else dtype,
                       gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True, seed=seed,
                       **kwargs)
        self.llm.sleep(level=1)
        self._pushed: int | None = None  # id of the model whose current weights the engine has

    def weights_changed(self) -> None:
        """The policy was updated: push its weights before the next generation."""
        self._pushed = None

    def __call__(self, model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, generator=None, on_step=None) -> Rollout:
        from vllm import SamplingParams

        seeds = _seeds(len(prompts), generator)
        self.llm.wake_up()
        try:
            self._push(model)
            params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                     seed=s, stop_token_ids=[eos_id], skip_special_tokens=False,
                                     detokenize=False) for s in seeds]
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        finally:
            self.llm.sleep(level=1)
        responses = [list(o.outputs[0].token_ids)[:max_new_tokens] for o in outputs]
        rollout = _rollout(prompts, responses, pad_id, eos_id, next(model.parameters()).device)
        if on_step is not None:  # the engine returns whole responses: a stream sees their tokens at the end
            for t in range(rollout.response_ids.shape[1]):
                on_step(torch.where(rollout.response_mask[:, t], rollout.response_ids[:, t], pad_id))
        return rollout

    def _push(self, model) -> None:
        """Load `model`'s current weights into the engine, unless they are the ones it has."""
        if self._pushed == id(model):
            return
        weights = _hf_weights(model)
        engine_model = _engine_model(self.llm)
        if engine_model is not None:
            engine_model.load_weights(weights=weights.items())
        else:  # newer engines: run the load on the worker(s)
            self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(weights=weights.items()))
        self._pushed = id(model)


def _seeds(n: int, generator) -> list[int]:
    """One vLLM seed per sample, from the caller's generator (a `SharedGenerator`: this process's rows)."""
    if isinstance(generator, SharedGenerator):
        u = torch.rand((generator.total,), dtype=torch.float64, generator=generator.generator)
        u = u[generator.start:generator.start + n]
    else:
        u = torch.rand((n,), dtype=torch.float64, generator=generator)
    return [int(x * 2**31) for x in u.tolist()]


def _hf_weights(model) -> dict[str, torch.Tensor]:
    """The parameters under their Hugging Face names (a PEFT model merged into its base first, on a copy)."""
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    return {name: p.detach() for name, p in model.state_dict().items()}


def _engine_model(llm):
    """The engine's model where this vLLM version exposes it in-process, else None."""
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    for path in (("worker", "model_runner", "model"), ("model_runner", "model")):
        obj = worker
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None and hasattr(obj, "load_weights"):
            return obj
    return None


def _rollout(prompts: list[list[int]], responses: list[list[int]], pad_id: int, eos_id: int, device) -> Rollout:
    """A `Rollout` of sampled token lists: EOS kept where a response ended with it, no log-probs (zeros)."""
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for i, r in enumerate(responses):
        if eos_id in r:
            r = r[:r.index(eos_id) + 1]
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = True
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    finished = (response_ids == eos_id).any(-1)
    return Rollout(prompt_ids, prompt_mask, response_ids.to(device), response_mask.to(device),
                   torch.zeros(response_ids.shape, device=device), finished.to(device))

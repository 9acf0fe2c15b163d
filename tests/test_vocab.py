"""The fused output layer → log-softmax → target pick (alignkit.models.vocab) against the plain computation:
values, entropies and the gradients of hidden states, weight and bias, over block boundaries, temperatures
and dtypes; and the guards that keep it off heads it must not read."""

import pytest
import torch

from alignkit.models import vocab
from alignkit.models.logps import logits_target_logps
from alignkit.models.vocab import fusable, head_target_logps


def plain(head, hidden, targets, temperature=1.0, entropy=None):
    """What alignkit computes without the fused node: the full logits, then `logits_target_logps`."""
    return logits_target_logps(head(hidden), targets, temperature, entropy)


def _case(m=37, h=16, v=53, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(h, v, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(v, generator=g, dtype=dtype))
    hidden = torch.randn(m, h, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (m,), generator=g)
    upstream = torch.randn(m, generator=g, dtype=torch.float64)
    return head, hidden, targets, upstream


def _run(fn, head, hidden, targets, upstream, temperature):
    head.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    entropy = []
    values = fn(head, hidden, targets, temperature, entropy)
    (values * upstream.to(values.dtype)).sum().backward()
    grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if head.bias is not None else [])
    return values.detach(), entropy[0], grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block", [1, 5, 10_000])  # rows per block: every row alone, ragged blocks, one block
def test_values_entropy_and_gradients_match_the_plain_computation_in_float64(monkeypatch, temperature, bias, block):
    monkeypatch.setattr(vocab, "BLOCK_ELEMENTS", 53 * block)
    monkeypatch.setattr(vocab, "MATMUL_BLOCK_ELEMENTS", 53 * block)
    case = _case(bias=bias)
    want = _run(plain, *case, temperature)
    got = _run(head_target_logps, *case, temperature)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_float64_gradients_pass_gradcheck():
    head, hidden, targets, _ = _case(m=6, h=4, v=7)

    def f(h, w, b):
        return vocab.LogitsTargets.apply(h, w, b, targets, 0.9, None)

    inputs = (hidden.requires_grad_(True), head.weight.detach().clone().requires_grad_(True),
              head.bias.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs)


def test_a_hand_worked_example():
    """V = 2, weights identity, h = (1, 0), target 0: log p = 1 − log(e + 1) = −0.3132617; ∂/∂h = (1 − p₀,
    −(1 − p₀)) with p₀ = e/(e+1) = 0.7310586 (∂x/∂h = W = I)."""
    head = torch.nn.Linear(2, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2, dtype=torch.float64))
    hidden = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    value = head_target_logps(head, hidden, torch.tensor([0]))
    value.sum().backward()
    assert value.item() == pytest.approx(-0.31326168751822286, abs=1e-15)
    torch.testing.assert_close(hidden.grad, torch.tensor([[0.2689414213699951, -0.2689414213699951]],
                                                         dtype=torch.float64), rtol=0, atol=1e-15)


def test_float32_matches_and_no_grad_reads_the_same_numbers():
    head, hidden, targets, upstream = _case(m=300, h=32, v=1000, dtype=torch.float32)
    want = _run(plain, head, hidden, targets, upstream, 1.0)
    got = _run(head_target_logps, head, hidden, targets, upstream, 1.0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-4)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        entropy = []
        values = head_target_logps(head, hidden, targets, 1.0, entropy)
    torch.testing.assert_close(values, got[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[0], got[1], rtol=0, atol=1e-4)


def test_bfloat16_head_upcasts_like_the_plain_path():
    """bf16 logits are upcast to float32 for the log-sum-exp; the products run in bf16, as autograd's would."""
    head, hidden, targets, upstream = _case(m=40, h=32, v=300, dtype=torch.bfloat16)
    want = _run(plain, head, hidden, targets, upstream, 1.0)
    got = _run(head_target_logps, head, hidden, targets, upstream, 1.0)
    assert got[0].dtype == torch.float32 and got[2][0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)  # same bf16 logits, same float32 maths
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_tied_weights_collect_both_gradients():
    """A head tied to the input embedding gets the embedding's gradient and the head's, summed."""
    emb = torch.nn.Embedding(11, 8, dtype=torch.float64)
    tokens = torch.tensor([1, 4, 4, 9])
    targets = torch.tensor([2, 3, 10, 0])
    grads = []
    for fn in (plain, head_target_logps):
        head = torch.nn.Linear(8, 11, bias=False, dtype=torch.float64)
        head.weight = emb.weight
        emb.zero_grad(set_to_none=True)
        fn(head, emb(tokens), targets).sum().backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_a_second_backward_through_one_graph_recomputes_the_logits():
    """The first backward turns the saved logits into their gradient in place; a second one (retain_graph)
    recomputes them from the saved inputs, and gets the same gradients."""
    head, hidden, targets, _ = _case()
    hidden.requires_grad_(True)
    out = head_target_logps(head, hidden, targets, 0.8).sum()
    out.backward(retain_graph=True)
    first = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    out.backward()
    for a, b in zip((hidden.grad, head.weight.grad, head.bias.grad), first):
        torch.testing.assert_close(a, 2 * b, rtol=1e-12, atol=1e-12)


def test_a_second_backward_under_autocast_recomputes_the_same_bf16_logits():
    head, hidden, targets, upstream = _case(m=24, h=16, v=300, dtype=torch.float32)
    hidden.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head_target_logps(head, hidden, targets)
    first = torch.autograd.grad((values * upstream.float()).sum(), hidden, retain_graph=True)[0]
    second = torch.autograd.grad((values * upstream.float()).sum(), hidden)[0]
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_double_backward_is_refused_rather_than_wrong():
    head, hidden, targets, _ = _case(m=5, h=4, v=9)
    hidden.requires_grad_(True)
    (g,) = torch.autograd.grad(head_target_logps(head, hidden, targets).sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad((g ** 2).sum(), head.weight)


def test_only_plain_unhooked_linear_heads_are_fused():
    head = torch.nn.Linear(4, 5)
    assert fusable(head)

    class Scaled(torch.nn.Linear):  # a subclass may change what forward computes
        def forward(self, x):
            return super().forward(x) * 2

    assert not fusable(Scaled(4, 5))
    assert not fusable(torch.nn.Sequential(torch.nn.Linear(4, 5)))
    handle = head.register_forward_hook(lambda module, args, out: out * 2)
    assert not fusable(head)
    handle.remove()
    handle = head.register_forward_pre_hook(lambda module, args: None)  # FSDP gathers its weights in such a hook
    assert not fusable(head)
    handle.remove()
    assert fusable(head)
    head.forward = lambda x: torch.nn.functional.linear(x, head.weight, head.bias) * 2  # as Accelerate's hooks do
    assert not fusable(head)
    del head.forward
    assert fusable(head)


def test_target_logps_of_a_model_use_the_fused_head_and_match_the_full_forward(tiny_model_dir, tokenizer):
    """Through `sequence_logps`: the fused path (the default for a Llama) against the full-logits fallback,
    values and the gradient of every parameter."""
    from alignkit.data.collate import collate_sequences
    from alignkit.data.tokenize import Tokenized
    from alignkit.models.load import load_causal_lm
    from alignkit.models.logps import _unwrap, sequence_logps

    model = load_causal_lm(tiny_model_dir)
    rng = torch.Generator().manual_seed(3)
    seqs = []
    for n in (9, 14, 5):
        ids = torch.randint(5, len(tokenizer), (n,), generator=rng).tolist()
        seqs.append(Tokenized(ids, [False] * 3 + [True] * (n - 3)))
    batch = collate_sequences(seqs, tokenizer.pad_token_id)
    results = []
    for fast in (True, False):
        sequence_logps(model, batch)  # runs the once-per-model check
        _unwrap(model)._alignkit_checks["fast_logits"] = fast
        model.zero_grad(set_to_none=True)
        entropy = []
        lp = sequence_logps(model, batch, temperature=0.8, entropy=entropy)
        (lp.token_logps * torch.linspace(-1, 1, lp.token_logps.shape[-1])).sum().backward()
        results.append((lp.token_logps.detach(), entropy[0], {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast_lp, fast_ent, fast_grads), (slow_lp, slow_ent, slow_grads) = results
    torch.testing.assert_close(fast_lp, slow_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast_ent, slow_ent, rtol=0, atol=1e-4)
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_blocks_are_cache_sized_on_cpu_and_launch_sized_on_an_accelerator():
    assert vocab._rows_per_block(32_000, torch.device("cpu")) == 32
    assert vocab._rows_per_block(152_064, torch.device("cpu")) == 6
    assert vocab._rows_per_block(152_064, torch.device("cuda")) == 2 ** 25 // 152_064 == 220
    assert vocab._rows_per_block(32_000, torch.device("cpu"), vocab.MATMUL_BLOCK_ELEMENTS) == 262
    assert vocab._rows_per_block(10 ** 9, torch.device("cpu")) == 1

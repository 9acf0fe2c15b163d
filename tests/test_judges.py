"""Judges (SPEC §9): each kind on tiny local models, the openai judge against a real local HTTP server."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from alignkit.errors import UserError
from alignkit.examples import WORDS, good_word_share
from alignkit.judges import JudgeScorer, Verdict, build_judge, judging_prompt, read_principles, read_template
from alignkit.judges.api import parse_verdict
from alignkit.judges.base import DEFAULT_TEMPLATE, combine_orders

PROMPT = "describe the red cat ->"
GOOD = "kind clear helpful honest"
BAD = "rude vague wrong lazy"


# ------------------------------------------------------------------------------------------------ rules
def test_python_judge_scores_and_compares_by_the_rule():
    judge = build_judge("python:alignkit.examples:good_word_share")
    assert judge.can_score
    assert judge.score(PROMPT, "kind rude") == pytest.approx(0.5)
    verdicts = judge.compare_batch([(PROMPT, GOOD, BAD), (PROMPT, BAD, GOOD), (PROMPT, "kind", "clear")])
    assert [v.winner for v in verdicts] == [0, 1, None]
    assert verdicts[0].confidence == pytest.approx(1 / (1 + torch.e ** -1.0))  # σ(1 − 0)
    assert verdicts[2] == Verdict(None, 0.5)
    assert judge.stats.comparisons == 3 and judge.stats.ties == 1 and judge.stats.position_bias is None


def test_judge_scorer_is_called_like_a_reward_scorer():
    scorer = JudgeScorer(build_judge("python:alignkit.examples:good_word_share"))
    scores, spread = scorer([PROMPT, [{"role": "user", "content": PROMPT}]], [GOOD, "kind rude"], [True, False])
    assert spread is None and scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx(good_word_share([PROMPT, PROMPT], [GOOD, "kind rude"]))


def test_bad_specs_are_user_errors():
    for spec in ("nope:x", "rm:", "python:alignkit.examples:missing", "openai:ftp://x#m", "rm:x#max"):
        with pytest.raises(UserError):
            build_judge(spec)
    with pytest.raises(UserError, match="lm: and openai:"):
        build_judge("python:alignkit.examples:good_word_share", principles=["be kind"])


# ------------------------------------------------------------------------------------------ reward models
@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A reward model from the tiny LM whose head reads the difference of the "kind" and "rude" embeddings
    (deterministic, content-dependent)."""
    from alignkit.models.load import load_reward_model, load_tokenizer, save_pretrained_atomic

    tok = load_tokenizer(tiny_model_dir)
    model = load_reward_model(tiny_model_dir, tok)
    with torch.no_grad():
        torch.manual_seed(1)
        model.score.weight.normal_()
    out = tmp_path_factory.mktemp("rm") / "rm"
    save_pretrained_atomic(model, tok, out)
    return str(out)


def test_rm_judge_matches_the_reward_scorer_and_compares_by_score(reward_model_dir):
    from types import SimpleNamespace

    from alignkit.rewards import Scorer

    judge = build_judge(f"rm:{reward_model_dir}")
    responses = [GOOD, BAD, "kind rude", "the cat"]
    scores = judge.score_batch([PROMPT] * 4, responses)
    cfg = SimpleNamespace(reward_models=(reward_model_dir,), reward_model="", reward_fn="", dtype="auto",
                          trust_remote_code=False, prefix_sharing=False, ensemble="mean", uwo_lambda=1.0)
    expected = Scorer(cfg, paths=[reward_model_dir])([PROMPT] * 4, responses)[0]
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    assert len(set(scores)) == 4
    verdicts = judge.compare_batch([(PROMPT, responses[0], responses[1]), (PROMPT, responses[1], responses[0])])
    assert verdicts[0].winner == (0 if scores[0] > scores[1] else 1)
    assert verdicts[1].winner == 1 - verdicts[0].winner
    assert verdicts[0].confidence == pytest.approx(torch.sigmoid(torch.tensor(abs(scores[0] - scores[1]))).item(),
                                                   abs=1e-5)
    # an ensemble of the same model twice with min scores the same
    twice = build_judge(f"rm:{reward_model_dir},{reward_model_dir}#min")
    assert twice.score_batch([PROMPT] * 4, responses) == pytest.approx(scores, abs=1e-4)


# --------------------------------------------------------------------------------------------- lm judge
def test_combine_orders_is_mt_bench_s_rule():
    a, b, tie = (0.7, 0.2, 0.1), (0.2, 0.7, 0.1), (0.2, 0.2, 0.6)
    v = combine_orders(a, b)  # forward says first (a); backward (b, a) says second (a again): consistent
    assert v.winner == 0 and v.both_orders and not v.flipped
    assert v.confidence == pytest.approx((0.7 + 0.05 + 0.7 + 0.05) / 2)
    v = combine_orders(a, a)  # first position wins in both orders: a flip, a tie
    assert v.winner is None and v.flipped and v.confidence == 0.5
    assert combine_orders(tie, tie) == Verdict(None, 0.5, both_orders=True)
    assert combine_orders(a, tie).flipped  # any change with the order is a flip
    assert combine_orders(None, b) == Verdict(0, pytest.approx(0.75), both_orders=False)
    assert combine_orders(None, None).failed


@pytest.fixture(scope="module")
def judge_lm_dir(tmp_path_factory):
    """A tiny LM whose vocabulary has the verdict tokens A, B, C (and "[[")."""
    from alignkit.models.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("lmjudge") / "lm", WORDS + ["A", "B", "C", "[[", "]]"],
                               seed=3))


def test_lm_judge_reads_the_verdict_from_log_probs_in_both_orders(judge_lm_dir):
    from transformers import AutoModelForCausalLM

    judge = build_judge(f"lm:{judge_lm_dir}", batch_size=3)
    items = [(PROMPT, GOOD, BAD), ("describe the blue dog ->", "kind", "rude wrong"), (PROMPT, BAD, "the cat")]
    verdicts = judge.compare_batch(items)

    # the oracle: plain transformers on each judging prompt, its next-token logits over A, B, C
    model = AutoModelForCausalLM.from_pretrained(judge_lm_dir).eval()
    ids = [judge.tokenizer.convert_tokens_to_ids(c) for c in ("A", "B", "C")]
    assert judge.choice_ids == ids

    def answer(p, x, y):
        seq = torch.tensor([judge.sequence(p, x, y)])
        with torch.no_grad():
            return model(seq).logits[0, -1, ids].softmax(-1).tolist()

    flips = 0
    for (p, x, y), v in zip(items, verdicts):
        expected = combine_orders(tuple(answer(p, x, y)), tuple(answer(p, y, x)))
        assert v.winner == expected.winner and v.flipped == expected.flipped and v.both_orders
        assert v.confidence == pytest.approx(expected.confidence, abs=1e-4)
        flips += v.flipped
    assert judge.stats.comparisons == 3 and judge.stats.both_orders == 3 and judge.stats.flips == flips
    assert not judge.can_score
    with pytest.raises(NotImplementedError):
        judge.score(PROMPT, GOOD)
    with pytest.raises(UserError, match="cannot score"):
        JudgeScorer(judge)


def test_an_lm_judge_that_always_picks_the_first_answer_flips_every_time(judge_lm_dir, tmp_path):
    """Attention and MLP outputs zeroed: the last hidden state is the embedding of the last token ("[["), and the
    output row of "A" is aligned with it, so the judge answers "A" whatever it reads — pure position bias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(judge_lm_dir)
    tok = AutoTokenizer.from_pretrained(judge_lm_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        last = model.model.norm(model.model.embed_tokens.weight[tok.convert_tokens_to_ids("[[")])
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids("A")] = 5 * last
    model.save_pretrained(tmp_path / "biased")
    tok.save_pretrained(tmp_path / "biased")
    judge = build_judge(f"lm:{tmp_path / 'biased'}")
    verdicts = judge.compare_batch([(PROMPT, GOOD, BAD), (PROMPT, BAD, GOOD)])
    assert all(v.flipped and v.winner is None for v in verdicts)
    assert judge.stats.position_bias == 1.0 and judge.stats.ties == 2


def test_lm_judge_needs_distinct_verdict_tokens(tiny_model_dir):
    with pytest.raises(UserError, match="distinct tokens"):
        build_judge(f"lm:{tiny_model_dir}")  # the built-in world's words have no A, B, C


# ---------------------------------------------------------------------------------- prompt and principles
def test_judging_prompt_places_principles_and_a_custom_template(tmp_path):
    text = judging_prompt(DEFAULT_TEMPLATE, ["Be honest.", "Be brief."], [{"role": "user", "content": "hi {x}"}],
                          "ans {answer_b}", "other")
    assert "1. Be honest.\n2. Be brief." in text and "hi {x}" in text
    assert "ans {answer_b}" in text and "[[C]]" in text  # a placeholder inside an answer is left alone
    (tmp_path / "p.txt").write_text("# constitution\nBe honest.\n\nBe brief.\n")
    assert read_principles(str(tmp_path / "p.txt")) == ["Be honest.", "Be brief."]
    (tmp_path / "t.txt").write_text("Q {question} 1 {answer_a} 2 {answer_b} {principles}")
    template = read_template(str(tmp_path / "t.txt"))
    assert judging_prompt(template, None, "q", "a", "b") == "Q q 1 a 2 b "
    (tmp_path / "bad.txt").write_text("Q {question} {answer_a}")
    with pytest.raises(UserError, match="answer_b"):
        read_template(str(tmp_path / "bad.txt"))


def test_parse_verdict_tolerates_prose():
    assert parse_verdict("I think [[A]] is better") == (1.0, 0.0, 0.0)
    assert parse_verdict("Not [[A]]... final: [[ b ]]") == (0.0, 1.0, 0.0)
    assert parse_verdict("[[C]]") == parse_verdict("It is a [[tie]].") == parse_verdict(" C. ") == (0, 0, 1.0)
    assert parse_verdict("both are fine") is None and parse_verdict("") is None


# ------------------------------------------------------------------------------- openai over real HTTP
class FakeJudgeServer:
    """/v1/chat/completions on 127.0.0.1: the longer answer wins ("I think [[A]] is better", prose around);
    a question with "biased" always gets "[[A]]"; one with "mute" gets no verdict; the first request gets 429."""

    def __init__(self):
        self.requests, self.messages, self.auth = 0, [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests += 1
                    first = server.requests == 1
                    server.messages.append(body["messages"])
                    server.auth.append(self.headers.get("Authorization"))
                if first:
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"})
                text = body["messages"][-1]["content"]
                a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
                b = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
                if "mute" in text:
                    reply = "I cannot decide."
                elif "biased" in text or len(a) > len(b):
                    reply = "Assistant A is more detailed. I think [[A]] is better."
                else:
                    reply = "After careful thought: [[B]]"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    server = FakeJudgeServer()
    yield server
    server.close()


def test_openai_judge_over_http_retries_caches_and_keeps_the_key_out(fake_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    items = [(PROMPT, "kind clear helpful", "rude"), ("describe the owl ->", "kind", "lazy vague wrong"),
             ("biased question", "kind", "rude")]
    spec = f"openai:{fake_server.url}#judge-model"
    judge = build_judge(spec, cache_dir=tmp_path / "cache", principles=["Prefer detail."], backoff=0.01,
                        concurrency=4)
    start = time.monotonic()
    verdicts = judge.compare_batch(items)
    assert time.monotonic() - start >= 0.2  # the retry waited for the server's Retry-After, not the 0.01 s backoff
    assert [v.winner for v in verdicts] == [0, 1, None]
    assert verdicts[2].flipped and judge.stats.position_bias == pytest.approx(1 / 3)
    assert fake_server.requests == 7  # 6 prompts (two orders × three items) + one retried after 429
    assert set(fake_server.auth) == {"Bearer sk-test-secret-123"}
    assert "1. Prefer detail." in fake_server.messages[-1][0]["content"]
    cache = (tmp_path / "cache" / "judge-cache.jsonl").read_text()
    assert len(cache.splitlines()) == 6 and "sk-test-secret" not in cache

    again = build_judge(spec, cache_dir=tmp_path / "cache", principles=["Prefer detail."])
    assert again.compare_batch(items) == verdicts
    assert fake_server.requests == 7 and again.requests == 0  # the rerun sends no request


def test_openai_judge_counts_failures_and_gives_up_after_retries(fake_server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = build_judge(f"openai:{fake_server.url}#m", cache_dir=tmp_path, backoff=0.01)
    v = judge.compare(("mute please"), "kind", "rude")
    assert v.failed and v.winner is None and judge.stats.failures == 1
    assert fake_server.auth[-1] is None  # no key, no header
    dead = build_judge("openai:http://127.0.0.1:9/v1#m", retries=1, backoff=0.01, timeout=2)
    assert dead.compare(PROMPT, "a", "b").failed and dead.requests == 4


def test_the_reply_cache_drops_a_torn_last_line(tmp_path):
    from alignkit.judges.api import ReplyCache

    cache = ReplyCache(tmp_path)
    cache.put("k1", "[[A]]")
    with open(tmp_path / "judge-cache.jsonl", "a") as f:
        f.write('{"key": "k2", "rep')
    again = ReplyCache(tmp_path)
    again.put("k3", "[[B]]")
    assert ReplyCache(tmp_path).replies == {"k1": "[[A]]", "k3": "[[B]]"}


def test_an_lm_judge_fine_tuned_on_verdicts_learns_the_world_without_position_bias(tmp_path):
    """sft a tiny LM on 2000 judging prompts (a short template, the better answer at a random position, the
    verdict "[[A]]" or "[[B]]"), then label 100 held-out shuffled pairs with it as an lm: judge. Measured:
    agreement 100%, position bias 0% (an untrained one: 0% and 100%, every verdict flips)."""
    import random

    from alignkit.config import LabelConfig, SFTConfig
    from alignkit.examples import pairwise_rows, write_jsonl
    from alignkit.judges.label import run_label
    from alignkit.models.tiny import save_tiny_model
    from alignkit.train.sft import train_sft

    template = "{principles}{question} A : {answer_a} B : {answer_b}"
    (tmp_path / "template.txt").write_text(template)
    save_tiny_model(tmp_path / "base", WORDS + ["A", "B", "C", "[[", "]]", ":"], seed=3)
    rng = random.Random(0)

    def rows(n, seed, for_sft):
        out = []
        for r in pairwise_rows(n, seed=seed):
            swap = rng.random() < 0.5
            a, b = (r["rejected"], r["chosen"]) if swap else (r["chosen"], r["rejected"])
            if for_sft:
                out.append({"prompt": [{"role": "user", "content": judging_prompt(template, None, r["prompt"], a, b)}],
                            "completion": [{"role": "assistant", "content": "[[B]]" if swap else "[[A]]"}]})
            else:
                out.append({"prompt": r["prompt"], "responses": [a, b], "label": int(swap)})
        return out

    write_jsonl(tmp_path / "sft.jsonl", rows(2000, 5, True))
    train_sft(SFTConfig(model=str(tmp_path / "base"), data=(str(tmp_path / "sft.jsonl"),),
                        output_dir=str(tmp_path / "judge"), epochs=4, batch_size=16, lr=1e-3, lr_schedule="cosine"))
    write_jsonl(tmp_path / "held.jsonl", rows(100, 123, False))
    common = dict(judge_template=str(tmp_path / "template.txt"), data=(str(tmp_path / "held.jsonl"),))
    report = run_label(LabelConfig(judge=f"lm:{tmp_path / 'judge' / 'final'}", output=str(tmp_path / "out.jsonl"),
                                   **common))
    assert report["agreement"] >= 0.9 and report["position_bias"] <= 0.1
    untrained = run_label(LabelConfig(judge=f"lm:{tmp_path / 'base'}", output=str(tmp_path / "raw.jsonl"), **common))
    assert untrained["agreement"] < 0.5

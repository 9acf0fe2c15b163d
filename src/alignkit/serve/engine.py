"""The generator behind `alignkit serve`: one worker thread owns the model and batches concurrent requests.

Requests (`Job`s) wait on futures. The worker takes the first job in its queue, waits up to `window_s` for
others (up to `max_batch_size` sequences in all), and generates them together with the rollout engine's
`generate` — one call per set of sampling settings (temperature, top_p), so 64 clients asking at once
cost about one batched generation, not 64. A job's `n × best_of` copies of its prompt share one prefill.
Best-of-N scores a choice's `best_of` candidates with the `Scorer` and keeps the best (`best_of_n_select`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from alignkit.rl.rollout import generate


class EngineStopped(RuntimeError):
    """The engine is not running (not started yet, or shutting down): the request was not generated."""


@dataclass
class Job:
    """One prompt of a request: `n` choices, each the best of `best_of` samples."""

    prompt: str | list[dict]    # as the client sent it (text or messages): what a reward sees
    prompt_ids: list[int]
    max_tokens: int
    n: int = 1
    best_of: int = 1
    temperature: float = 1.0    # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # streaming: on_piece(choice, text) gets each choice's text as it is sampled, then (None, "") once the
    # future is done; called on the worker thread
    on_piece: Callable[[int | None, str], None] | None = None
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return self.n * self.best_of

    @property
    def sampling(self) -> tuple:
        """Jobs with equal sampling settings are generated in one call (greedy ones whatever their top_p). The
        seed is not one of them: seeded requests with distinct seeds would otherwise each cost a generation."""
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)


@dataclass
class Choice:
    text: str
    completion_tokens: int
    finish_reason: str                  # "stop" (EOS or a stop string) | "length"
    ids: list[int] = field(default_factory=list, repr=False)  # the sampled tokens before EOS
    score: float | None = None          # Best-of-N: the kept candidate's score
    candidate_scores: list[float] | None = None


def stop_index(text: str, stops: tuple[str, ...]) -> int:
    """Where the first stop string starts in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def best_of_n_select(scorer, prompts: list, texts: list[str], finished: list[bool],
                     groups: list[int]) -> list[tuple[int, list[float]]]:
    """Consecutive groups of candidates, each group the samples of one prompt (`groups`: their sizes), scored
    in one `scorer` call: for each group (index of its best candidate, the group's scores). Ties keep the
    first candidate."""
    scores = scorer(prompts, texts, finished)[0].tolist()
    out, start = [], 0
    for size in groups:
        group = scores[start:start + size]
        out.append((start + max(range(size), key=group.__getitem__), group))
        start += size
    return out


class Engine:
    """Owns the model (and the scorer) on one worker thread; `submit(job)` returns a future of `list[Choice]`."""

    def __init__(self, model, tokenizer, scorer=None, *, window_s: float = 0.01, max_batch_size: int = 64,
                 seed: int = 0, generate_fn=generate):
        self.model, self.tokenizer, self.scorer = model.eval(), tokenizer, scorer
        self.generate_fn = generate_fn  # alignkit's sampler, or vLLM (`alignkit.rl.vllm_backend`)
        self.window_s, self.max_batch_size = window_s, max_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.tokenizer_lock = threading.Lock()  # the app encodes while the worker decodes
        self.context_length = (getattr(model.config, "max_position_embeddings", None)
                               or getattr(tokenizer, "model_max_length", None) or 2048)
        self.batches = 0        # generate calls made (tests and /health read them)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="alignkit-serve-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight, fail the jobs still queued, stop the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def submit(self, job: Job) -> Future:
        if self._thread is None:
            raise EngineStopped("the server is not running")
        self._queue.put(job)
        return job.future

    # -- the worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        held: deque[Job] = deque()  # a job that did not fit the last batch goes first in the next
        stopping = False
        while not stopping:
            job = held.popleft() if held else self._queue.get()
            if job is None:
                break
            batch, rows = [job], job.rows
            deadline = time.monotonic() + self.window_s
            while rows < self.max_batch_size:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                if rows + more.rows > self.max_batch_size:
                    held.append(more)
                    break
                batch.append(more)
                rows += more.rows
            self._run(batch)
        while not self._queue.empty():  # shutting down: nobody will generate what is left
            held.append(self._queue.get_nowait())
        for job in held:
            if job is not None and job.future.set_running_or_notify_cancel():
                _settle(job, error=EngineStopped("the server is shutting down"))

    def _run(self, batch: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.sampling, []).append(job)
        for jobs in groups.values():
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # drop cancelled ones
            if not jobs:
                continue
            try:
                results = self._generate(jobs)
            except Exception as e:  # a failed batch fails its requests, not the server
                for job in jobs:
                    _settle(job, error=e)
                continue
            for job, choices in zip(jobs, results):
                _settle(job, choices)

    def _generate(self, jobs: list[Job]) -> list[list[Choice]]:
        temperature, top_p = jobs[0].sampling
        # best effort, as OpenAI's: a seeded request sampled alone gets the same text again
        seeds = [job.seed for job in jobs if job.seed is not None]
        generator = torch.Generator().manual_seed(seeds[0]) if seeds else self.generator
        prompts = [job.prompt_ids for job in jobs for _ in range(job.rows)]
        streamer = _Streamer(self, jobs)
        # temperature 0: generate divides the logits by 1e-6, which makes sampling the argmax (greedy)
        out = self.generate_fn(self.model, prompts, pad_id=self.tokenizer.pad_token_id, eos_id=self.tokenizer.eos_token_id,
                       max_new_tokens=max(job.max_tokens for job in jobs), temperature=temperature, top_p=top_p,
                       generator=generator, on_step=streamer.step if streamer.rows else None)
        self.batches += 1
        sampled = out.response_ids.tolist()                                   # (rows, R)
        candidates, row = [], 0
        with self.tokenizer_lock:
            for job in jobs:
                candidates.append([self._choice(job, sampled[row + i]) for i in range(job.rows)])
                row += job.rows
        best_of = [(job, cands) for job, cands in zip(jobs, candidates) if job.best_of > 1]
        if best_of:  # every Best-of-N candidate of the batch in one scorer call
            flat = [c for _, cands in best_of for c in cands]
            picks = iter(best_of_n_select(self.scorer, [job.prompt for job, cands in best_of for _ in cands],
                                          [c.text for c in flat], [c.finish_reason == "stop" for c in flat],
                                          [job.best_of for job, _ in best_of for _ in range(job.n)]))
        results = []
        for job, cands in zip(jobs, candidates):
            if job.best_of == 1:
                results.append(cands)
                continue
            chosen = []
            for _ in range(job.n):
                index, scores = next(picks)
                flat[index].score, flat[index].candidate_scores = max(scores), scores
                chosen.append(flat[index])
            results.append(chosen)
        streamer.finish(jobs, results)
        return results

    def _choice(self, job: Job, ids: list[int]) -> Choice:
        ids = ids[:job.max_tokens]
        eos = self.tokenizer.eos_token_id
        finish = "length"
        if eos in ids:
            ids, finish = ids[:ids.index(eos)], "stop"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = stop_index(text, job.stop)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        return Choice(text, len(ids), finish, ids)


def _settle(job: Job, choices: list[Choice] | None = None, error: Exception | None = None) -> None:
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(choices)
    if job.on_piece is not None:
        job.on_piece(None, "")


class _Streamer:
    """Sends the text of streaming jobs as it is sampled: after each step, what the new token adds to a
    choice (`job.on_piece(choice, text)`), holding back what could still turn out to be the start of a stop
    string or an incomplete character. A Best-of-N choice is known only once its candidates are scored: its
    text goes out at the end, in per-token pieces."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine = engine
        self.rows: list[tuple[Job, int, int]] = []  # (job, choice, row in the batch) of live-streamed choices
        row = 0
        for job in jobs:
            if job.on_piece is not None and job.best_of == 1:
                self.rows += [(job, c, row + c) for c in range(job.n)]
            row += job.rows
        self.ids: dict[int, list[int]] = {r: [] for _, _, r in self.rows}
        self.sent: dict[int, str] = {r: "" for _, _, r in self.rows}
        self.done: set[int] = set()

    def _decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, token: torch.Tensor) -> None:
        tokens = token.tolist()                                                # (B,)
        eos = self.engine.tokenizer.eos_token_id
        with self.engine.tokenizer_lock:
            for job, c, r in self.rows:
                if r in self.done:
                    continue
                if tokens[r] == eos or len(self.ids[r]) >= job.max_tokens:
                    self.done.add(r)
                    continue
                self.ids[r].append(tokens[r])
                text = self._decode(self.ids[r])
                cut = stop_index(text, job.stop)
                if cut >= 0:
                    text = text[:cut]
                    self.done.add(r)
                else:
                    text = text[:len(text) - max((len(s) for s in job.stop), default=1) + 1].rstrip("\ufffd")
                self._send(job, c, r, text)

    def _send(self, job: Job, c: int, r: int, text: str) -> None:
        sent = self.sent[r]
        if len(text) > len(sent) and text.startswith(sent):  # a decoder that rewrites earlier text waits
            job.on_piece(c, text[len(sent):])
            self.sent[r] = text

    def finish(self, jobs: list[Job], results: list[list[Choice]]) -> None:
        """The rest of every streaming choice's text (all of it for Best-of-N choices)."""
        with self.engine.tokenizer_lock:
            row = 0
            for job, choices in zip(jobs, results):
                if job.on_piece is None:
                    pass
                elif job.best_of == 1:
                    for c, choice in enumerate(choices):
                        self._send(job, c, row + c, choice.text)
                else:
                    for c, choice in enumerate(choices):
                        done = ""
                        for k in range(1, len(choice.ids) + 1):
                            upto = self._decode(choice.ids[:k])[:len(choice.text)]
                            if len(upto) > len(done) and upto.startswith(done):
                                job.on_piece(c, upto[len(done):])
                                done = upto
                row += job.rows

"""`openai:URL#MODEL`: the pairwise judging prompt over any OpenAI-compatible chat API.

The key comes from `OPENAI_API_KEY` only and goes nowhere but the Authorization header: not into the cache,
logs, reports or error messages. Requests run in a thread pool (`concurrency` at once), time out, and are
retried with exponential backoff on 429, 5xx and transport errors. Every answer is cached on disk (JSON lines,
keyed by a hash of the model and the full messages), so a rerun of the same comparisons sends no request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alignkit.errors import UserError
from alignkit.judges.base import DEFAULT_TEMPLATE, Answer, PairwiseJudge, judging_prompt

_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"^\W*(A|B|C|tie)\W*$", re.IGNORECASE)
ONE_HOT = {"a": (1.0, 0.0, 0.0), "b": (0.0, 1.0, 0.0), "c": (0.0, 0.0, 1.0), "tie": (0.0, 0.0, 1.0)}


def parse_verdict(text: str | None) -> Answer:
    """The last "[[A]]", "[[B]]" or "[[C]]" (or "[[tie]]") in a reply, prose around it allowed; a reply that is
    only the letter also counts. None when there is none (a failure)."""
    if not text:
        return None
    found = _VERDICT.findall(text)
    if found:
        return ONE_HOT[found[-1].lower()]
    bare = _BARE.match(text.strip())
    return ONE_HOT[bare.group(1).lower()] if bare else None


class ReplyCache:
    """Replies on disk, one JSON line each: {"key": sha256 of (model, messages), "reply": text}. Appends are
    flushed line by line; a torn last line (a killed run) is ignored on load."""

    def __init__(self, folder: str | os.PathLike | None):
        self.path = Path(folder) / "judge-cache.jsonl" if folder else None
        self.replies: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # a torn last line: cut it, or the next reply would join it
                data = data[:data.rfind(b"\n") + 1]
                with open(self.path, "r+b") as f:
                    f.truncate(len(data))
            for line in data.decode("utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    self.replies[record["key"]] = record["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(model: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        with self._lock:
            self.replies[key] = reply
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": reply}) + "\n")
                f.flush()


class OpenAIJudge(PairwiseJudge):
    """`openai:URL#MODEL`, URL the API base (e.g. http://127.0.0.1:8000/v1). Counts `requests` sent."""

    RETRY_STATUS = (429, 500, 502, 503, 504)

    def __init__(self, base_url: str, model: str, *, template: str | None = None,
                 principles: list[str] | None = None, cache_dir=None, concurrency: int = 8, timeout: float = 60.0,
                 retries: int = 5, backoff: float = 1.0, max_tokens: int = 512):
        super().__init__()
        if not base_url.startswith(("http://", "https://")) or not model:
            raise UserError(f"judge openai:{base_url}#{model}: expected openai:http(s)://HOST/v1#MODEL")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.template, self.principles = template or DEFAULT_TEMPLATE, principles
        self.cache = ReplyCache(cache_dir)
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.max_tokens = max_tokens
        self.requests = 0
        self._count_lock = threading.Lock()

    def messages(self, prompt, answer_a, answer_b) -> list[dict]:
        return [{"role": "user", "content": judging_prompt(self.template, self.principles, prompt, answer_a,
                                                            answer_b)}]

    def _headers(self) -> dict:
        key = os.environ.get("OPENAI_API_KEY", "")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _request(self, client, messages: list[dict]) -> str | None:
        """The reply text, or None after the last retry. 401/403/404 are configuration errors (raised)."""
        import httpx

        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        asked_wait = 0.0  # a server's Retry-After (seconds, at most a minute) when it gave one
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(max(self.backoff * 2 ** (attempt - 1), asked_wait))
            with self._count_lock:
                self.requests += 1
            try:
                response = client.post(self.url, json=body, headers=self._headers())
            except httpx.HTTPError:  # timeouts, refused connections: retried
                continue
            if response.status_code in self.RETRY_STATUS:
                try:
                    asked_wait = min(60.0, max(0.0, float(response.headers.get("retry-after", 0))))
                except ValueError:  # an HTTP date: keep to the backoff
                    asked_wait = 0.0
                continue
            if response.status_code in (401, 403, 404):
                raise UserError(f"judge {self.url} (model {self.model}) answered {response.status_code}"
                                + (" (is OPENAI_API_KEY right?)" if response.status_code != 404 else ""))
            if response.status_code != 200:
                return None
            try:
                return response.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                return None
        return None

    def _answers(self, items) -> list[Answer]:
        import httpx

        asked = [self.messages(*item) for item in items]
        keys = [self.cache.key(self.model, m) for m in asked]
        replies = [self.cache.get(k) for k in keys]
        todo = [i for i, r in enumerate(replies) if r is None]
        if todo:
            with httpx.Client(timeout=self.timeout) as client, ThreadPoolExecutor(self.concurrency) as pool:
                fetched = list(pool.map(lambda i: self._request(client, asked[i]), todo))
            for i, reply in zip(todo, fetched):
                if reply is not None:
                    replies[i] = reply
                    if parse_verdict(reply) is not None:  # a reply without a verdict is asked again next time
                        self.cache.put(keys[i], reply)
        return [parse_verdict(r) for r in replies]

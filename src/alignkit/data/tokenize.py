"""Rows → token ids. The conventions every trainer shares (and that TRL uses, so numbers compare):

- A prompt string is encoded with the tokenizer's special tokens (BOS); a response string without them,
  and EOS is appended to every response (unless it already ends with EOS), so the model learns to stop.
- Conversations go through the tokenizer's chat template; a tokenizer without one gets
  `DEFAULT_CHAT_TEMPLATE` (`role: content` lines, EOS after each assistant turn, `assistant:` as the
  generation prompt). The response of a conversational row is the text the template adds after the
  prompt's generation prompt.
- Multi-turn `messages`: loss on the assistant turns only. Each turn is the template's text between
  rendering the conversation up to the turn (with the generation prompt) and up to its end.
- Truncation: a prompt longer than `max_prompt_length` (0 = half of `max_length`) keeps its last tokens (the
  question is at the end) and its BOS;
  then a response that does not fit `max_length` is cut at its end (it loses its EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.errors import DataError

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the documented default (saved with the model)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def ensure_pad_token(tokenizer) -> None:
    """Tokenizers without a pad token pad with EOS (attention masks keep padding out of every loss)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


@dataclass(frozen=True)
class Tokenized:
    """One sequence: `ids` and which of them are trained on (`loss_mask`, True = takes part)."""

    ids: list[int]
    loss_mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_text(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def prompt_length_limit(max_length: int, max_prompt_length: int = 0) -> int:
    """The longest prompt in tokens: `max_prompt_length`, or half of `max_length` when it is 0 (the configs'
    default, so that `--max-length` alone never leaves the prompt limit above it)."""
    return max_prompt_length or max(1, max_length // 2)


class Encoder:
    """Encodes prompts and responses of any row kind with one tokenizer and one set of length limits.

    `max_prompt_length` 0 = half of `max_length` (`prompt_length_limit`); the attribute holds the limit in use.
    """

    def __init__(self, tokenizer, max_length: int = 1024, max_prompt_length: int = 0):
        ensure_chat_template(tokenizer)
        ensure_pad_token(tokenizer)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = prompt_length_limit(max_length, max_prompt_length)
        self.eos_id = tokenizer.eos_token_id

    # -- pieces -------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt, source: str = "") -> list[int]:
        if isinstance(prompt, str):
            ids = _encode_text(self.tokenizer, prompt, special=True)
        else:
            ids = _encode_text(self.tokenizer, _render(self.tokenizer, prompt, True), special=False)
        if len(ids) <= self.max_prompt_length:
            return ids
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[0] == bos:  # keep the start-of-sequence token of a cut prompt
            return [bos] + ids[len(ids) - self.max_prompt_length + 1:]
        return ids[-self.max_prompt_length:]

    def response_ids(self, prompt, response, source: str = "") -> list[int]:
        if isinstance(response, str) and isinstance(prompt, str):
            ids = _encode_text(self.tokenizer, response, special=False)
        else:
            context = _as_messages(prompt)
            turns = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
            before = _render(self.tokenizer, context, True)
            full = _render(self.tokenizer, context + turns, False)
            if not full.startswith(before):
                raise DataError(source, "the chat template does not render the response after the prompt's "
                                        "generation prompt; pass prompt and response as strings instead")
            ids = _encode_text(self.tokenizer, full[len(before):].rstrip("\n"), special=False)
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        return ids

    def join(self, prompt_ids: list[int], response_ids: list[int]) -> Tokenized:
        room = self.max_length - len(prompt_ids)
        response_ids = response_ids[:room]
        return Tokenized(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))

    # -- whole rows -----------------------------------------------------------------------------------------
    def prompt_response(self, prompt, response, source: str = "", completion_only: bool = True) -> Tokenized:
        p = self.prompt_ids(prompt, source) if (prompt != "" and prompt != []) else self._bos()
        seq = self.join(p, self.response_ids(prompt, response, source))
        if not completion_only:
            seq = Tokenized(seq.ids, [True] * len(seq.ids))
        return seq

    def messages(self, messages: list[dict], source: str = "", completion_only: bool = True) -> Tokenized:
        """A multi-turn conversation with loss on every assistant turn (and nothing else)."""
        ids: list[int] = []
        mask: list[bool] = []
        done = ""  # rendered text already encoded
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _render(self.tokenizer, messages[:i], True) if i else _render(self.tokenizer, [], True)
            upto = _render(self.tokenizer, messages[: i + 1], False)
            if not (before.startswith(done) and upto.startswith(before)):
                raise DataError(source, "the chat template does not render each assistant turn after the "
                                        "conversation before it; cannot mask the loss to assistant turns")
            context = _encode_text(self.tokenizer, before[len(done):], special=False)
            turn = _encode_text(self.tokenizer, upto[len(before):], special=False)
            ids += context + turn
            mask += [False] * len(context) + [True] * len(turn)
            done = upto
        tail = _render(self.tokenizer, messages, False)[len(done):]
        if tail.strip():
            tail_ids = _encode_text(self.tokenizer, tail, special=False)
            ids += tail_ids
            mask += [False] * len(tail_ids)
        if not completion_only:
            mask = [True] * len(ids)
        return Tokenized(ids[: self.max_length], mask[: self.max_length])

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None else []

    def sft(self, row, completion_only: bool = True) -> Tokenized:
        if row.messages is not None:
            return self.messages(row.messages, row.source, completion_only)
        return self.prompt_response(row.prompt, row.completion, row.source, completion_only)


def same_vocabulary(a, b) -> bool:
    """Whether tokenizer `b` gives every token of tokenizer `a` the same id (it may have extra tokens)."""
    other = b.get_vocab()
    return all(other.get(token) == i for token, i in a.get_vocab().items())

"""`alignkit label` (SPEC §9): a judge labels candidate responses into a preference dataset (RLAIF).

Two candidates give a pairwise row (`prompt`, `chosen`, `rejected`); more give a ranked row (`prompt`,
`responses` best first, `scores`): the judge's scores where it can score, else the wins of a round robin of
comparisons (a tie is half a win). An input that mixes pairs with larger sets gives ranked rows throughout (a
pair is a ranking of two), so the output is one row kind that the trainers read as it is. With `policy`, rows without responses get `n` sampled candidates (the samples
of a prompt share its prefill, `alignkit.rl.rollout.generate`).

Resume: every output line carries `_row` (the input row's index) and `_judge` (what judging it took), and is
appended with one write and an fsync, so `kill -9` loses at most the rows in flight. A pair the judge could
not order (a tie, a failure) goes to OUTPUT's `.skipped.jsonl` instead, so every input row ends up in exactly one
of the two files; a rerun skips the rows found in either (dropping a torn last line) and the closing report
covers all of them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.data.formats import InvalidRecord, read_records
from alignkit.data.rows import parse_row
from alignkit.errors import DataError, UserError
from alignkit.judges import Judge, Verdict, build_judge, read_principles, read_template


@dataclass
class Task:
    index: int                   # the input row's number (0-based, over all files)
    prompt: object               # as in the data: text or chat messages
    responses: list | None       # candidates; None = to generate
    label: int | None            # index of the truly better response (for the agreement report)


def sidecars(output: str | os.PathLike) -> tuple[Path, Path]:
    """(skipped rows, report) next to the output: OUT.skipped.jsonl and OUT.report.json (suffix replaced)."""
    out = Path(output)
    stem = out.with_suffix("") if out.suffix else out
    return Path(f"{stem}.skipped.jsonl"), Path(f"{stem}.report.json")


# ------------------------------------------------------------------------------------------------- input
def read_tasks(paths, allow_prompts: bool, on_bad_row: str = "error") -> tuple[list[Task], int]:
    """Every input row as a Task (numbered in file order), and how many bad rows were skipped."""
    tasks, bad, index = [], 0, 0
    for path in paths:
        for where, record in read_records(path):
            try:
                tasks.append(_task(index, where, record, allow_prompts))
            except DataError:
                if on_bad_row == "error":
                    raise
                bad += 1
            index += 1
    if not tasks:
        raise UserError("no rows to label")
    return tasks, bad


def _task(index: int, where: str, record, allow_prompts: bool) -> Task:
    if isinstance(record, InvalidRecord):
        raise DataError(where, record.message)
    if isinstance(record, dict) and record.get("responses") is not None:
        row = parse_row({k: v for k, v in record.items() if k != "scores"}, "ranked", where)  # keep the order
        label = record.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)
                                  or not 0 <= label < len(row.responses)):
            raise DataError(where, f'field "label" must be the index of a response (0 to {len(row.responses) - 1}), '
                                   f"got {label!r}")
        return Task(index, row.prompt, list(row.responses), label)
    if not allow_prompts:
        raise DataError(where, 'field "responses" is missing (two or more candidates; or give --policy to generate '
                               'them)')
    return Task(index, parse_row(record, "prompts", where).prompt, None, None)


# ------------------------------------------------------------------------------------------ output files
def done_rows(path: Path) -> list[dict]:
    """The complete lines of an append-only JSONL file; a torn last line (a killed write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[:data.rfind(b"\n") + 1]
    rows = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("_row"), int):
            rows.append(record)
    return rows


class AppendOnly:
    """A file that grows one whole line at a time: one write() of the line, then fsync."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self.fd, data)
        while written < len(data):  # (a regular file takes the whole line at once; this is for the odd case)
            written += os.write(self.fd, data[written:])
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------------------------- judging
def _judging(verdicts: list[Verdict], agree: float | None) -> dict:
    return {"comparisons": len(verdicts), "both_orders": sum(v.both_orders for v in verdicts),
            "flips": sum(v.flipped for v in verdicts), "failures": sum(v.failed for v in verdicts),
            "ties": sum(v.tie for v in verdicts), "agree": agree}


def _as_response(prompt, text: str):
    """A sampled response in the prompt's shape (an assistant turn for a conversational prompt)."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def judge_tasks(judge: Judge, tasks: list[Task], ranked: bool = False) -> list[tuple[bool, dict]]:
    """(goes to the output, the line) for each task with responses: one batched call of the judge for all.
    `ranked`: every task gives a ranked row, two candidates included (for a dataset that mixes pairs with
    larger sets: one file holds one row kind)."""
    as_pair = lambda t: len(t.responses) == 2 and not ranked  # noqa: E731
    pairs = [(t, i, j) for t in tasks for i in range(len(t.responses)) for j in range(i + 1, len(t.responses))
             if as_pair(t) or not judge.can_score]
    scored = [t for t in tasks if not as_pair(t) and judge.can_score]
    verdicts = judge.compare_batch([(t.prompt, t.responses[i], t.responses[j]) for t, i, j in pairs])
    scores = judge.score_batch([t.prompt for t in scored for _ in t.responses],
                               [r for t in scored for r in t.responses]) if scored else []
    scored_rows = {t.index for t in scored}
    by_task: dict[int, list] = {}
    for (t, i, j), v in zip(pairs, verdicts):
        by_task.setdefault(t.index, []).append((i, j, v))
    cursor, out = 0, []
    for t in tasks:
        base = {"_row": t.index}
        if as_pair(t):
            v = by_task[t.index][0][2]
            agree = None if t.label is None else float(v.winner == t.label)
            if v.winner is None:
                out.append((False, {**base, "reason": "failed" if v.failed else "tie", "_judge": _judging([v], agree)}))
                continue
            chosen, rejected = t.responses[v.winner], t.responses[1 - v.winner]
            out.append((True, {"prompt": t.prompt, "chosen": chosen, "rejected": rejected, **base,
                               "_judge": _judging([v], agree)}))
            continue
        row_verdicts = [v for _, _, v in by_task.get(t.index, [])]
        if t.index in scored_rows:
            values = scores[cursor:cursor + len(t.responses)]
            cursor += len(t.responses)
        else:  # a round robin: a win is 1, a tie or a failure half for each side
            values = [0.0] * len(t.responses)
            for i, j, v in by_task[t.index]:
                if v.winner is None:
                    values[i] += 0.5
                    values[j] += 0.5
                else:
                    values[(i, j)[v.winner]] += 1.0
        top = [k for k, s in enumerate(values) if s == max(values)]
        agree = None if t.label is None else (1.0 / len(top) if t.label in top else 0.0)
        order = sorted(range(len(values)), key=lambda k: -values[k])
        out.append((True, {"prompt": t.prompt, "responses": [t.responses[k] for k in order],
                           "scores": [values[k] for k in order], **base, "_judge": _judging(row_verdicts, agree)}))
    return out


def summarise(lines: list[dict], judge: Judge | None = None, bad_rows: int = 0) -> dict:
    """The closing report over every judged row (this run's and earlier runs'): agreement with `label` (a tie or
    a failure is not an agreement), the position-bias rate (flips / comparisons asked in both orders), the tie
    rate and the judge's failures."""
    stats = [line["_judge"] for line in lines if isinstance(line.get("_judge"), dict)]
    total = {k: sum(s.get(k, 0) for s in stats) for k in ("comparisons", "both_orders", "flips", "failures", "ties")}
    agree = [s["agree"] for s in stats if s.get("agree") is not None]
    report = {
        "rows": len(lines), "written": sum("_judge" in line and "reason" not in line for line in lines),
        "skipped_ties": sum(line.get("reason") == "tie" for line in lines),
        "skipped_failures": sum(line.get("reason") == "failed" for line in lines), "bad_rows": bad_rows,
        "labelled": len(agree), "agreement": sum(agree) / len(agree) if agree else None,
        **total,
        "position_bias": total["flips"] / total["both_orders"] if total["both_orders"] else None,
        "tie_rate": total["ties"] / total["comparisons"] if total["comparisons"] else None,
    }
    if judge is not None and hasattr(judge, "requests"):
        report["requests_this_run"] = judge.requests
    return report


def format_report(report: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    return (f"labelled {report['rows']} rows: {report['written']} written, {report['skipped_ties']} ties and "
            f"{report['skipped_failures']} failures skipped; agreement with label {pct(report['agreement'])} "
            f"({report['labelled']} rows); position bias {pct(report['position_bias'])}; tie rate "
            f"{pct(report['tie_rate'])}; judge failures {report['failures']} of {report['comparisons']} comparisons")


# ---------------------------------------------------------------------------------------------- command
def run_label(cfg) -> dict:
    """`alignkit label`: see the module doc. Returns the closing report (also written to OUT.report.json)."""
    from tqdm import tqdm

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output)
    skipped_path, report_path = sidecars(out)
    tasks, bad = read_tasks(cfg.data, allow_prompts=bool(cfg.policy), on_bad_row=cfg.on_bad_row)
    judge = build_judge(cfg.judge, trust_remote_code=cfg.trust_remote_code, principles=read_principles(cfg.principles),
                        template=read_template(cfg.judge_template),
                        cache_dir=cfg.cache_dir or f"{out.with_suffix('') if out.suffix else out}.judge-cache",
                        dtype=cfg.dtype)
    if cfg.resume == "never":
        for path in (out, skipped_path, report_path):
            path.unlink(missing_ok=True)
    done = {line["_row"] for line in done_rows(out) + done_rows(skipped_path)}
    # one row kind per file: pairs only when no row has (or will be generated with) more than two candidates
    ranked = any((len(t.responses) if t.responses is not None else cfg.n) > 2 for t in tasks)
    generator = _Generator(cfg) if any(t.responses is None and t.index not in done for t in tasks) else None
    written, skipped = AppendOnly(out), AppendOnly(skipped_path)
    try:
        with tqdm(total=len(tasks), initial=sum(t.index in done for t in tasks), desc="label", unit="row",
                  file=sys.stderr, disable=None) as bar:
            for begin in range(0, len(tasks), cfg.batch_size):  # fixed chunks: a chunk's sampling seed is its start
                chunk = [t for t in tasks[begin:begin + cfg.batch_size] if t.index not in done]
                if not chunk:
                    continue
                missing = [t for t in chunk if t.responses is None]
                if missing:
                    for t, texts in zip(missing, generator([t.prompt for t in missing], seed=cfg.seed, chunk=begin)):
                        t.responses = [_as_response(t.prompt, text) for text in texts]
                for keep, line in judge_tasks(judge, chunk, ranked):
                    (written if keep else skipped).write(line)
                bar.update(len(chunk))
    finally:
        written.close()
        skipped.close()
    report = summarise(done_rows(out) + done_rows(skipped_path), judge, bad)
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, report_path)
    print(format_report(report))
    return report


class _Generator:
    """The policy that samples `n` candidates per prompt (batched; a prompt's samples share its KV cache)."""

    def __init__(self, cfg):
        from alignkit.data.tokenize import Encoder
        from alignkit.models.load import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(cfg.policy, cfg.trust_remote_code)
        self.model = load_causal_lm(cfg.policy, cfg.dtype, cfg.trust_remote_code, for_training=False).eval()
        self.encoder = Encoder(self.tokenizer, cfg.max_length, cfg.max_prompt_length)
        self.cfg = cfg
        from alignkit.rl.vllm_backend import generate_fn_for

        self.generate_fn = generate_fn_for(cfg, cfg.policy)

    def __call__(self, prompts: list, seed: int, chunk: int) -> list[list[str]]:
        from alignkit.rl.responses import sample_responses

        cfg = self.cfg
        generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        sampled = sample_responses(self.model, self.tokenizer, [(p, self.encoder.prompt_ids(p)) for p in prompts],
                                   cfg.n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_p=cfg.top_p, generator=generator, generate_fn=self.generate_fn)
        return [sampled.texts[i * cfg.n:(i + 1) * cfg.n] for i in range(len(prompts))]

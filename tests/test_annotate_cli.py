"""`alignkit annotate` from the command line: add-annotator's token and link; user mistakes exit 2 with one line
naming file, line and field; export's kinds and aggregations; and the server killed with `kill -9` in the middle
of a session loses no judgement it acknowledged."""

import json
import random
import re
import signal
import subprocess
import threading
import time

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("uvicorn")

from alignkit.annotate.db import open_store  # noqa: E402
from alignkit.annotate.ranking import ranks_from_groups  # noqa: E402
from alignkit.cli import main  # noqa: E402
from conftest import Harness  # noqa: E402
from test_annotate_db import candidates, judge  # noqa: E402


def test_add_annotator_prints_a_token_and_the_link(tmp_path, capsys):
    db = str(tmp_path / "feedback.sqlite")
    assert main(["annotate", "add-annotator", "alice", "--db", db, "--port", "8123"]) == 0
    out = capsys.readouterr().out
    token = re.search(r"^token: (\S+)$", out, re.M).group(1)
    assert f"link: http://127.0.0.1:8123/?token={token}" in out
    assert open_store(db).authenticate(token).name == "alice"
    assert main(["annotate", "add-annotator", "boss", "--db", db, "--admin", "--url", "https://annotate.example.org/"]) == 0
    out = capsys.readouterr().out
    token = re.search(r"^token: (\S+)$", out, re.M).group(1)
    assert f"progress: https://annotate.example.org/progress?token={token}" in out
    assert open_store(db).authenticate(token).admin


BAD_CANDIDATES = {
    "no responses": ('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": "q"}\n', ":2:", 'field "responses" is missing'),
    "five responses": ('{"prompt": "p", "responses": ["a", "b", "c", "d", "e"]}\n', ":1:", "holds 5 responses"),
    "one response": ('{"prompt": "p", "responses": ["a"]}\n', ":1:", 'field "responses" must hold at least 2'),
    "bad label": ('{"prompt": "p", "responses": ["a", "b"], "label": 2}\n', ":1:", 'field "label"'),
    "empty response": ('{"prompt": "p", "responses": ["a", " "]}\n', ":1:", 'field "responses[1]" is empty'),
    "bad scores": ('{"prompt": "p", "responses": ["a", "b"], "scores": [1]}\n', ":1:", 'field "scores"'),
    "invalid json": ('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": \n', ":2:", "invalid JSON"),
}


@pytest.mark.parametrize("case", BAD_CANDIDATES)
def test_bad_candidates_exit_2_naming_file_line_and_field(tmp_path, capsys, case):
    text, line, words = BAD_CANDIDATES[case]
    data = tmp_path / "candidates.jsonl"
    data.write_text(text)
    db = tmp_path / "feedback.sqlite"
    assert main(["annotate", "--data", str(data), "--db", str(db), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{data}{line}" in err and words in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not db.exists()  # the candidates are checked before the database is made


def test_candidates_from_label_ranked_or_pairwise(tmp_path):
    from alignkit.annotate.candidates import read_candidates

    data = tmp_path / "labelled.jsonl"
    data.write_text('{"prompt": "p", "responses": ["b", "a", "c"], "scores": [2, 3, 1], "_row": 0}\n'
                    '{"prompt": "q", "chosen": "yes", "rejected": "no", "_row": 1}\n')
    ranked, pair = read_candidates([str(data)])
    assert ranked.responses == ["b", "a", "c"] and ranked.scores == [2.0, 3.0, 1.0] and ranked.label is None
    assert pair.responses == ["yes", "no"] and pair.scores == [1.0, 0.0] and pair.source == f"{data}:2"


def test_other_mistakes_exit_2_with_one_line(tmp_path, capsys):
    db = str(tmp_path / "feedback.sqlite")
    not_db = tmp_path / "notes.txt"
    not_db.write_text("hello\n" * 100)
    cases = [
        (["annotate", "--data", str(tmp_path / "missing.jsonl"), "--db", db], "no such file"),
        (["annotate", "--db", db, "--port", "0"], "holds no items"),
        (["annotate", "--data", str(tmp_path / "missing.jsonl"), "--db", db, "--overlap", "0"], "--overlap"),
        (["annotate", "export", "--db", str(tmp_path / "nope.sqlite"), "--kind", "ranked", "--output", "x.jsonl"],
         "no such database"),
        (["annotate", "stats", "--db", str(not_db)], "cannot use the database"),
        (["annotate", "export", "--db", db, "--kind", "pairwise", "--output", str(tmp_path / "o.jsonl")],
         "no judgements to export yet"),
        (["annotate", "add-annotator", "   ", "--db", db], "name"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert main(["annotate", "add-annotator", "alice", "--db", db]) == 0
    assert main(["annotate", "add-annotator", "alice", "--db", db]) == 2
    assert "--reset" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_export_kinds_and_aggregations(tmp_path, capsys):
    from alignkit.data.formats import load_rows

    db = str(tmp_path / "feedback.sqlite")
    store = open_store(db)
    store.add_items(candidates(3))
    a, b, c = (store.authenticate(store.add_annotator(n)) for n in ("a", "b", "c"))
    judge(store, a.id, {1: [1, 2, 3], 2: [1, 1, 2], 3: [1, 2, 3]}, 3)
    judge(store, b.id, {1: [1, 3, 2], 2: [1, 1, 1], 3: [1, 2, 3]}, 3)
    judge(store, c.id, {1: [2, 1, 3]}, 3)
    flagged = store.current(c.id, 3)
    store.submit(c.id, flagged.item_id, [[0], [1], [2]], unsafe=True)  # item 2, flagged
    counts = {}
    for kind in ("ranked", "pairwise", "unary"):
        for aggregate in ("none", "majority", "plackett-luce"):
            out = tmp_path / f"{kind}-{aggregate}.jsonl"
            assert main(["annotate", "export", "--db", db, "--kind", kind, "--output", str(out),
                         "--aggregate", aggregate]) == 0
            assert f"to {out}" in capsys.readouterr().out
            loaded = load_rows([str(out)], kind="auto")
            assert loaded.kind == kind
            counts[kind, aggregate] = len(loaded.rows)
    # per judgement: 8 rankings (a 3, b 3, c 2); pairwise: item 1 has 3 pairs × 3 judgements, item 2 2 + 0 + 3
    # (a tied two, b all three), item 3 3 × 2
    assert counts["ranked", "none"] == 8 and counts["pairwise", "none"] == 9 + 5 + 6
    assert counts["unary", "none"] == 2 * 7  # b's all-tied ranking has no best and worst
    assert counts["ranked", "majority"] == counts["ranked", "plackett-luce"] == 3
    # item 1 by majority: response 0 above 1 (2 of 3) and above 2 (3 of 3); 1 above 2 (2 of 3)
    majority = [json.loads(x) for x in (tmp_path / "ranked-majority.jsonl").read_text().splitlines()]
    assert majority[0]["responses"] == ["item 0 answer 0", "item 0 answer 1", "item 0 answer 2"]
    assert majority[0]["scores"] == [2.0, 1.0, 0.0] and majority[0]["_judgements"] == 3
    out = tmp_path / "safe.jsonl"
    assert main(["annotate", "export", "--db", db, "--kind", "ranked", "--output", str(out), "--skip-flagged",
                 "--min-judgements", "2", "--aggregate", "majority"]) == 0
    assert [json.loads(x)["_item"] for x in out.read_text().splitlines()] == [1, 3]


# ------------------------------------------------------------------------------------------- kill -9
def start_server(db: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(Harness.command(["annotate", "--db", db, "--port", "0", "--overlap", "1"]),
                            env=Harness.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"on (http://\S+/)", line)
    assert match, line + proc.stderr.read()
    return proc, match.group(1).rstrip("/")


def test_kill_9_in_the_middle_of_a_session_loses_no_submitted_judgement(tmp_path):
    import httpx

    db = str(tmp_path / "feedback.sqlite")
    store = open_store(db)
    store.add_items(candidates(40, k=4))
    headers = {"Authorization": f"Bearer {store.add_annotator('alice')}"}
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    acknowledged = {}  # item id -> the groups the server said it saved
    for _round in range(2):
        proc, url = start_server(db)
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            state = client.get("/api/state").json()
            assert state["progress"]["done"] == len(acknowledged)  # everything from before the kill is there
            for _ in range(rng.randint(3, 8)):
                groups = [[p] for p in rng.sample(range(4), 4)]
                response = client.post("/api/judgements", json={"item": state["item"]["id"], "ranking": groups})
                assert response.status_code == 200
                acknowledged[state["item"]["id"]] = groups
                state = response.json()
            # one more submission in flight, and kill -9 while it may be anywhere in the server
            in_flight, reply = state["item"]["id"], {}
            groups = [[0, 1], [2], [3]]

            def send(client, item, groups, reply):
                try:
                    reply["response"] = client.post("/api/judgements", json={"item": item, "ranking": groups})
                except httpx.HTTPError:
                    pass

            sender = threading.Thread(target=send, args=(client, in_flight, groups, reply))
            sender.start()
            time.sleep(rng.uniform(0.0, 0.03))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            sender.join(10)
        if reply.get("response") is not None and reply["response"].status_code == 200:
            acknowledged[in_flight] = groups
        store = open_store(db)
        a = store.authenticate(headers["Authorization"].split()[1])
        for item_id, groups_sent in acknowledged.items():
            saved = store.judgement(a.id, item_id)
            assert saved.status == "done", f"judgement of item {item_id} lost (seed {seed})"
            assert saved.ranks == ranks_from_groups(groups_sent, saved.order)
        flying = store.judgement(a.id, in_flight)
        assert (flying.status, flying.ranks is None) in (("open", True), ("done", False)), flying  # whole or none
        if flying.status == "done":
            acknowledged[in_flight] = groups  # committed just before the kill, unacknowledged: kept whole
        store.close()
    proc, url = start_server(db)  # a third start: the session goes on, and SIGTERM stops it cleanly
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        assert client.get("/api/state").json()["progress"]["done"] == len(acknowledged)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0 and "stopped" in proc.stdout.read()

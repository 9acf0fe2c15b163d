"""The HTTP layer of `alignkit annotate` (alignkit.annotate.app), in process: no page and no write without a valid
token; malformed submissions get 400 and write nothing; model text that holds HTML or <script> reaches the page
as data only; nobody sees another annotator's answers; skip, revise and the admin's progress page."""

import json
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("fastapi")
pytest.importorskip("jinja2")

from alignkit.annotate.app import build_app  # noqa: E402
from alignkit.annotate.candidates import Candidate  # noqa: E402
from alignkit.annotate.db import open_store  # noqa: E402

XSS = "<script>alert('pwned')</script><b>bold</b> & <img src=x onerror=alert(1)>"


@pytest.fixture
def served(tmp_path):
    from fastapi.testclient import TestClient

    store = open_store(str(tmp_path / "feedback.sqlite"))
    store.add_items([Candidate("say <i>hi</i>", [XSS, "plain & simple", "hello"], None, None, "c.jsonl:1")]
                    + [Candidate(f"question {i}", [f"answer {i}a", f"answer {i}b"], None, None, f"c.jsonl:{i + 2}")
                       for i in range(3)])
    tokens = {name: store.add_annotator(name) for name in ("alice", "bob")}
    tokens["boss"] = store.add_annotator("<b>boss</b>", admin=True)
    return SimpleNamespace(store=store, client=TestClient(build_app(store, overlap=2)), tokens=tokens)


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def table(store) -> list[tuple]:
    """Every row of the judgements table: what "no write" compares."""
    from sqlalchemy import select

    with store.engine.connect() as c:
        return [tuple(row) for row in c.execute(select(store.judgements).order_by(store.judgements.c.id))]


def page_state(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="state">(.*?)</script>', html, re.S).group(1))


def test_a_missing_or_wrong_token_gets_no_page_and_no_write(served):
    client, token = served.client, served.tokens["alice"]
    for params, headers in (({}, {}), ({"token": "wrong"}, {}), ({"token": token[:-1]}, {}),
                            ({}, {"Authorization": f"Basic {token}"}), ({"token": ""}, {})):
        response = client.get("/", params=params, headers=headers)
        assert response.status_code == 401
        assert "question" not in response.text and "answer" not in response.text and 'id="state"' not in response.text
    for method, path, body in (("GET", "/api/state", None), ("GET", "/api/last", None),
                               ("POST", "/api/judgements", {"item": 1, "ranking": [[0], [1], [2]]}),
                               ("POST", "/api/skip", {"item": 1})):
        for headers in ({}, auth("wrong"), auth(token + "x")):
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401 and "error" in response.json()
        assert client.request(method, path, json=body, params={"token": token}).status_code == 401  # header only
    assert client.get("/progress", params={"token": "nope"}).status_code == 401
    assert client.get("/progress", params={"token": token}).status_code == 403  # not an admin
    assert table(served.store) == []  # nothing was written, not even an item put on someone's screen


def test_malformed_submissions_get_400_and_write_nothing(served):
    client, headers = served.client, auth(served.tokens["alice"])
    item = client.get("/api/state", headers=headers).json()["item"]
    before = table(served.store)
    good = {"item": item["id"], "ranking": [[0], [1, 2]]}
    bad_bodies = [b"not json", b"[1, 2]", b'"text"', b"{", json.dumps({"ranking": [[0], [1, 2]]}).encode(),
                  json.dumps({"item": item["id"]}).encode()]
    bad_fields = [{"item": "1"}, {"item": True}, {"ranking": "0,1,2"}, {"ranking": []}, {"ranking": [[0], [1]]},
                  {"ranking": [[0], [0, 1, 2]]}, {"ranking": [[0], [1], [3]]}, {"ranking": [[0], [], [1, 2]]},
                  {"ranking": [[0], [1, 2.0]]}, {"ranking": [[False], [1, 2]]}, {"ranking": [[-1], [0, 1, 2]]},
                  {"comment": 5}, {"unsafe": "yes"}, {"extra": 1}, {"comment": "x" * 5001}]
    for body in bad_bodies + [json.dumps({**good, **change}).encode() for change in bad_fields]:
        response = client.post("/api/judgements", content=body, headers={**headers, "Content-Type": "application/json"})
        assert response.status_code == 400, body
        assert response.json()["error"]
    huge = client.post("/api/judgements", content=b" " * 70_000, headers=headers)
    assert huge.status_code == 413
    assert client.post("/api/skip", json={"item": [item["id"]]}, headers=headers).status_code == 400
    assert table(served.store) == before
    response = client.post("/api/judgements", json={**good, "comment": " ok ", "unsafe": True}, headers=headers)
    assert response.status_code == 200 and response.json()["outcome"] == "submitted"
    saved = served.store.judgement(served.store.authenticate(served.tokens["alice"]).id, item["id"])
    assert saved.status == "done" and saved.comment == "ok" and saved.unsafe


def test_model_text_with_html_and_script_is_data_not_markup(served):
    client = served.client
    response = client.get("/", params={"token": served.tokens["alice"]})
    assert response.status_code == 200
    html = response.text
    assert "<script>alert" not in html and "<b>bold" not in html and "<img src=x" not in html
    assert "<i>hi</i>" not in html
    assert "\\u003cscript\\u003ealert" in html  # the JSON island escapes < and >: no tag can start in it
    state = page_state(html)
    assert state["item"]["prompt"] == "say <i>hi</i>" and XSS in state["item"]["responses"]  # exact text back
    assert html.count("<script") == 2  # the state island and static/annotate.js; nothing else
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"
    script = client.get("/static/annotate.js").text
    assert not re.search(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write", script)  # text only
    assert ".textContent = " in script
    admin = client.get("/progress", params={"token": served.tokens["boss"]})
    assert admin.status_code == 200 and "&lt;b&gt;boss&lt;/b&gt;" in admin.text and "<b>boss" not in admin.text
    assert "4 items, each for 2 annotators: <strong>0</strong> complete, 0 started, 4 untouched" in " ".join(admin.text.split())


def test_nobody_sees_another_annotators_answers(served):
    client = served.client
    alice, bob = auth(served.tokens["alice"]), auth(served.tokens["bob"])
    item = client.get("/api/state", headers=alice).json()["item"]
    client.post("/api/judgements", json={"item": item["id"], "ranking": [[2], [0, 1]], "comment": "secret note",
                                         "unsafe": True}, headers=alice)
    state = client.get("/api/state", headers=bob).json()
    assert state["item"]["id"] == item["id"]  # the same item (overlap 2) ...
    assert state["item"]["ranking"] is None and state["item"]["comment"] == "" and not state["item"]["unsafe"]
    assert not state["can_revise"] and state["progress"] == {"done": 0, "skipped": 0, "left": 4}
    page = client.get("/", params={"token": served.tokens["bob"]}).text
    assert "secret note" not in page and "secret note" not in json.dumps(state)
    assert client.get("/api/last", headers=bob).status_code == 409  # bob has nothing to revise
    # bob cannot change alice's judgement
    assert client.post("/api/judgements", json={"item": 2, "ranking": [[0], [1]]}, headers=bob).status_code == 409


def test_skip_and_revise_over_http(served):
    client, headers = served.client, auth(served.tokens["alice"])
    first = client.get("/api/state", headers=headers).json()["item"]
    after = client.post("/api/judgements", json={"item": first["id"], "ranking": [[1], [0, 2]]}, headers=headers).json()
    second = after["item"]
    assert second["id"] != first["id"] and after["can_revise"] and after["progress"]["done"] == 1
    skipped = client.post("/api/skip", json={"item": second["id"]}, headers=headers).json()
    assert skipped["outcome"] == "skipped" and skipped["item"]["id"] not in (first["id"], second["id"])
    last = client.get("/api/last", headers=headers).json()
    assert last["item"]["id"] == first["id"] and last["item"]["revising"]
    assert last["item"]["ranking"] == [[1], [0, 2]] and last["item"]["responses"] == first["responses"]
    revised = client.post("/api/judgements", json={"item": first["id"], "ranking": [[0, 1, 2]]}, headers=headers)
    assert revised.json()["outcome"] == "revised"
    assert revised.json()["item"]["id"] == skipped["item"]["id"]  # back to the item on screen
    assert client.post("/api/skip", json={"item": first["id"]}, headers=headers).status_code == 409
    assert client.post("/api/judgements", json={"item": 99, "ranking": [[0], [1]]}, headers=headers).status_code == 409
    judged = served.store.judgement(served.store.authenticate(served.tokens["alice"]).id, first["id"])
    assert judged.ranks == [1, 1, 1] and judged.revised_at is not None

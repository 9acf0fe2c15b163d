"""The annotation database (alignkit.annotate.db) against SQLite, and against PostgreSQL when
ALIGNKIT_TEST_DATABASE_URL names one (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test; its alignkit tables
are dropped first): schema and versions, items, hashed tokens, the overlap queue, stored display orders, skip and
revise. The helpers at the top are shared with the other test_annotate*.py files."""

import hashlib
import os
import threading

import pytest

pytest.importorskip("sqlalchemy")

from alignkit.annotate.candidates import Candidate  # noqa: E402
from alignkit.annotate.db import Conflict, open_store  # noqa: E402
from alignkit.annotate.ranking import InvalidRanking, groups_from_ranks  # noqa: E402
from alignkit.errors import UserError  # noqa: E402


# ----------------------------------------------------------------------------------------------- helpers
def drop_tables(url: str) -> None:
    from sqlalchemy import create_engine

    from alignkit.annotate.db import _tables

    engine = create_engine(url)
    _tables()[0].drop_all(engine)
    engine.dispose()


def candidates(n: int, k: int = 3, label: bool = False) -> list[Candidate]:
    """n items of k responses: response r of item i is "item i answer r"; label 0 when asked."""
    return [Candidate(f"question {i}", [f"item {i} answer {r}" for r in range(k)], 0 if label else None, None,
                      f"c.jsonl:{i + 1}") for i in range(n)]


def judge(store, annotator_id: int, desired: dict, overlap: int) -> list[int]:
    """Rank the annotator's queue: `desired[item_id]` = ranks (data order) to give; stops at an item not in it
    (which stays on their screen) or at the end of the queue. Returns the item ids judged, in order."""
    judged = []
    while (j := store.current(annotator_id, overlap)) is not None and j.item_id in desired:
        assert store.submit(annotator_id, j.item_id, groups_from_ranks(desired[j.item_id], j.order)) == "submitted"
        judged.append(j.item_id)
    return judged


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """The --db of a fresh database: a SQLite file, or the emptied PostgreSQL of ALIGNKIT_TEST_DATABASE_URL."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.sqlite")
    url = os.environ.get("ALIGNKIT_TEST_DATABASE_URL")
    if not url:
        pytest.skip("set ALIGNKIT_TEST_DATABASE_URL=postgresql+psycopg://... to run against PostgreSQL")
    drop_tables(url)
    return url


# ------------------------------------------------------------------------------------------------- tests
def test_schema_is_created_versioned_and_kept(db):
    from sqlalchemy import update

    store = open_store(db)
    assert store.schema_version() == 1
    assert store.add_items(candidates(3)) == 3
    store.close()
    store = open_store(db)  # reopened: the same data, no second schema
    assert store.count_items() == 3 and store.schema_version() == 1
    with store.engine.begin() as c:
        c.execute(update(store.meta).where(store.meta.c.key == "schema_version").values(value="99"))
    store.close()
    with pytest.raises(UserError, match="newer alignkit"):
        open_store(db)


def test_items_are_added_once(db):
    store = open_store(db)
    assert store.add_items(candidates(4)) == 4
    assert store.add_items(candidates(6)) == 2  # the first four are there already
    items = store.all_items()
    assert [item.prompt for item in items.values()] == [f"question {i}" for i in range(6)]
    assert items[1].responses == ["item 0 answer 0", "item 0 answer 1", "item 0 answer 2"]


def test_tokens_are_random_stored_hashed_and_checked(db):
    from sqlalchemy import select

    store = open_store(db)
    token = store.add_annotator("alice")
    other = store.add_annotator("bob", admin=True)
    assert len(token) >= 32 and token != other
    with store.engine.connect() as c:
        stored = [tuple(row) for row in c.execute(select(store.annotators))]
    assert not any(token in str(value) for row in stored for value in row)  # never the token itself
    assert hashlib.sha256(token.encode()).hexdigest() in {row[2] for row in stored}
    if "://" not in db:
        store.close()
        assert token.encode() not in open(db, "rb").read()
        store = open_store(db)
    assert store.authenticate(token).name == "alice" and not store.authenticate(token).admin
    assert store.authenticate(other).admin
    for wrong in (None, "", token[:-1], token + "x", token.upper(), "x" * 10_000):
        assert store.authenticate(wrong) is None
    with pytest.raises(UserError, match="exists"):
        store.add_annotator("alice")
    new = store.add_annotator("alice", reset=True)
    assert store.authenticate(token) is None and store.authenticate(new).name == "alice"


def test_each_item_goes_to_k_annotators_then_leaves_every_queue(db, monkeypatch):
    import alignkit.annotate.db as db_module

    store = open_store(db)
    store.add_items(candidates(4))
    a, b, c = (store.authenticate(store.add_annotator(name)) for name in ("a", "b", "c"))
    everything = {i: [1, 2, 3] for i in range(1, 5)}
    first = store.current(a.id, 2)
    assert first.item_id == 1
    store.submit(a.id, 1, [[0], [1], [2]])
    assert store.current(b.id, 2).item_id == 1  # an item someone judged comes first (overlapping sets fill up)
    assert store.current(c.id, 2).item_id == 2  # item 1 has a judgement and is on b's screen: it is full
    assert judge(store, b.id, everything, 2) == [1, 2, 3, 4]
    assert judge(store, a.id, everything, 2) == [3, 4]  # item 2: b's judgement and c's screen
    assert store.progress(a.id, 2) == {"done": 3, "skipped": 0, "left": 0}
    assert judge(store, c.id, everything, 2) == [2]  # c's item stayed theirs
    assert store.current(c.id, 2) is None
    assert sorted(j.item_id for j in store.judgements_of()) == [1, 1, 2, 2, 3, 3, 4, 4]
    # a hold runs out: once the item is complete without the holder, it leaves their screen too
    store.add_items(candidates(5))
    assert store.current(c.id, 1).item_id == 5
    monkeypatch.setattr(db_module, "RESERVATION_S", -1.0)
    assert judge(store, a.id, {5: [1, 2, 3]}, 1) == [5]
    assert store.current(c.id, 1) is None and store.judgement(c.id, 5) is None


def test_display_order_is_random_and_stored(db):
    store = open_store(db)
    store.add_items(candidates(30, k=4))
    a = store.authenticate(store.add_annotator("a"))
    orders = []
    for _ in range(30):
        shown = store.current(a.id, 1)
        assert store.current(a.id, 1).order == shown.order  # the same order every time it is shown
        assert sorted(shown.order) == [0, 1, 2, 3]
        store.submit(a.id, shown.item_id, [[0], [1], [2], [3]])
        assert store.judgement(a.id, shown.item_id).order == shown.order
        orders.append(tuple(shown.order))
    assert len(set(orders)) > 5  # 30 draws from 24 orders; fewer than 6 distinct has probability < 1e-20


def test_skip_and_revise_the_last_judgement(db):
    store = open_store(db)
    store.add_items(candidates(4))
    a = store.authenticate(store.add_annotator("a"))
    b = store.authenticate(store.add_annotator("b"))
    one = store.current(a.id, 1)
    store.submit(a.id, one.item_id, [[0], [1], [2]], comment="fine", unsafe=False)
    two = store.current(a.id, 1)
    store.submit(a.id, two.item_id, [[0, 1], [2]])
    assert store.last_done(a.id).item_id == two.item_id
    assert store.submit(a.id, two.item_id, [[2], [0, 1]], comment="changed my mind", unsafe=True) == "revised"
    revised = store.judgement(a.id, two.item_id)
    assert revised.ranks == [2 if p in (0, 1) else 1 for p in (revised.order.index(i) for i in range(3))]
    assert revised.comment == "changed my mind" and revised.unsafe and revised.revised_at is not None
    with pytest.raises(Conflict):
        store.submit(a.id, one.item_id, [[0], [1], [2]])  # not the last one any more
    three = store.current(a.id, 1)
    with pytest.raises(Conflict):
        store.submit(b.id, three.item_id, [[0], [1], [2]])  # not b's item
    with pytest.raises(InvalidRanking):
        store.submit(a.id, three.item_id, [[0], [1]])
    assert store.judgement(a.id, three.item_id).status == "open"  # nothing written
    store.skip(a.id, three.item_id)
    with pytest.raises(Conflict):
        store.skip(a.id, three.item_id)
    with pytest.raises(Conflict):
        store.submit(a.id, three.item_id, [[0], [1], [2]])
    assert store.current(a.id, 1).item_id not in (one.item_id, two.item_id, three.item_id)
    assert store.current(b.id, 1).item_id == three.item_id  # a skip leaves the item for others
    assert store.progress(a.id, 1) == {"done": 2, "skipped": 1, "left": 1}  # item 4, on screen


def test_annotators_working_at_once_fill_exactly_k_judgements_per_item(db):
    store = open_store(db)
    store.add_items(candidates(12))
    people = [store.authenticate(store.add_annotator(f"p{i}")) for i in range(4)]
    errors = []

    def work(person):
        try:
            judge(store, person.id, {i: [3, 1, 2] for i in range(1, 13)}, 2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    per_item = {}
    for j in store.judgements_of():
        per_item[j.item_id] = per_item.get(j.item_id, 0) + 1
    assert per_item == {i: 2 for i in range(1, 13)}


def test_a_file_that_is_not_an_annotation_database_is_refused(tmp_path):
    import sqlite3

    data = tmp_path / "candidates.jsonl"
    data.write_text('{"prompt": "p", "responses": ["a", "b"]}\n' * 100)
    with pytest.raises(UserError, match="cannot use the database"):
        open_store(str(data))
    assert data.read_text().startswith('{"prompt"')  # untouched
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("create table items (x text)")
    with pytest.raises(UserError, match="alignkit did not make"):
        open_store(str(other))
    with pytest.raises(UserError, match="no such database"):
        open_store(str(tmp_path / "missing.sqlite"), must_exist=True)
    with pytest.raises(UserError, match="not a database URL"):
        open_store("nosuchdialect://x/y")

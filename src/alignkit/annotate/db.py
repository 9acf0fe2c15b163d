"""The annotation database, through SQLAlchemy Core: SQLite by default (one file, no server), or any SQLAlchemy
URL (``postgresql+psycopg://user@host/db``) for a team.

Tables (schema version 1, kept in ``alignkit_meta``; created on first use):
- ``items``: the candidates (prompt, 2–4 responses, optional label and scores), unique by their content, so
  importing a file again adds only what is new.
- ``annotators``: a name, the SHA-256 digest of the annotator's token (never the token), an admin flag.
- ``judgements``: one row per (item, annotator), created when the item is first shown: the display order (a
  random permutation, stored so that position bias can be measured), then the ranks, comment, unsafe flag
  and times. ``status`` is open (shown), done or skipped.

Every write is its own transaction, committed before the call returns: a judgement the page was told about
is on disk (SQLite in WAL mode with ``synchronous=FULL``), so killing the server loses none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from alignkit.annotate.candidates import Candidate
from alignkit.annotate.ranking import ranks_from_groups
from alignkit.errors import UserError

SCHEMA_VERSION = 1
TOKEN_BYTES = 24             # secrets.token_urlsafe(24): 32 characters, 192 random bits
MAX_TOKEN_LENGTH = 200       # anything longer is not a token of ours (and is not hashed)
RESERVATION_S = 30 * 60      # an item shown to someone is held for them this long (then others may get it)
MAX_NAME_LENGTH = 100
MAX_COMMENT_LENGTH = 5000


class Conflict(Exception):
    """A request that does not fit the annotator's queue (e.g. a stale page): the HTTP layer answers 409."""


@dataclass(frozen=True)
class Item:
    id: int
    source: str
    prompt: object
    responses: list
    label: int | None
    scores: list[float] | None


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    admin: bool


@dataclass(frozen=True)
class Judgement:
    id: int
    item_id: int
    annotator_id: int
    status: str                  # open | done | skipped
    order: list[int]             # response indices (data order) in the order shown
    ranks: list[int] | None      # per response in data order, 1 = best, ties share a rank (done only)
    comment: str
    unsafe: bool
    shown_at: float
    submitted_at: float | None
    revised_at: float | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _tables():
    from sqlalchemy import (
        JSON,
        Boolean,
        Column,
        Float,
        ForeignKey,
        Index,
        Integer,
        MetaData,
        String,
        Table,
        Text,
        UniqueConstraint,
    )

    metadata = MetaData()
    meta = Table("alignkit_meta", metadata, Column("key", String(64), primary_key=True),
                 Column("value", Text, nullable=False))
    items = Table(
        "items", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("content_key", String(64), nullable=False, unique=True),  # sha256 of prompt + responses
        Column("source", Text, nullable=False),
        Column("prompt", JSON, nullable=False),
        Column("responses", JSON, nullable=False),
        Column("label", Integer),
        Column("scores", JSON),
        Column("created_at", Float, nullable=False),
    )
    annotators = Table(
        "annotators", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", String(MAX_NAME_LENGTH), nullable=False, unique=True),
        Column("token_hash", String(64), nullable=False, unique=True),
        Column("admin", Boolean, nullable=False),
        Column("created_at", Float, nullable=False),
    )
    judgements = Table(
        "judgements", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("item_id", Integer, ForeignKey("items.id"), nullable=False),
        Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
        Column("status", String(8), nullable=False),
        Column("display_order", JSON, nullable=False),
        Column("ranks", JSON),
        Column("comment", Text, nullable=False),
        Column("unsafe", Boolean, nullable=False),
        Column("shown_at", Float, nullable=False),
        Column("submitted_at", Float),
        Column("revised_at", Float),
        UniqueConstraint("item_id", "annotator_id"),
        Index("ix_judgements_annotator_status", "annotator_id", "status"),
        Index("ix_judgements_item_status", "item_id", "status"),
    )
    return metadata, meta, items, annotators, judgements


def database_url(db: str) -> str:
    """A SQLAlchemy URL as it is, or a file path as a SQLite URL."""
    if "://" in db:
        return db
    return "sqlite:///" + str(Path(db).expanduser().resolve())


def open_store(db: str, must_exist: bool = False) -> Store:
    """The Store for `--db` (a path or a URL). `must_exist`: a SQLite file that is not there is an error (for
    commands that only read, such as export and stats) instead of a new, empty database."""
    if "://" not in db:
        if must_exist and not os.path.exists(db):
            raise UserError(f"{db}: no such database (the annotate command creates it)")
        if os.path.isdir(db):
            raise UserError(f"{db}: is a folder; --db takes a database file or an SQLAlchemy URL")
        Path(db).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    return Store(database_url(db), shown=db)


class Store:
    """Every read and write of the app, the exporter and the statistics. Thread-safe: the server's request
    threads share one Store (one lock serialises the writes that choose what an annotator sees next)."""

    def __init__(self, url: str, shown: str | None = None):
        self.url = url
        self.shown = _safe_name(shown or url)  # how messages name the database: never with its password
        self.metadata, self.meta, self.items, self.annotators, self.judgements = _tables()
        self.engine = _engine(url, self.shown)
        self._lock = threading.Lock()
        self._random = random.SystemRandom()
        self._prepare()

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        from sqlalchemy import insert, inspect, select
        from sqlalchemy.exc import SQLAlchemyError

        ours = {t.name for t in self.metadata.sorted_tables}
        try:
            with self.engine.begin() as c:
                present = set(inspect(c).get_table_names())
                if "alignkit_meta" not in present and present & ours:
                    clash = ", ".join(sorted(present & ours))
                    raise UserError(f"{self.shown}: has tables named {clash} that alignkit did not make; "
                                    f"use another database")
                self.metadata.create_all(c)
                version = c.execute(select(self.meta.c.value).where(self.meta.c.key == "schema_version")).scalar()
                if version is None:
                    c.execute(insert(self.meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                elif int(version) > SCHEMA_VERSION:
                    raise UserError(f"{self.shown}: written by a newer alignkit (schema version {version}; this "
                                    f"one knows {SCHEMA_VERSION}); upgrade alignkit")
                # (older versions would be migrated here, in order, each in this transaction)
        except SQLAlchemyError as e:
            raise UserError(f"{self.shown}: cannot use the database: {_reason(e)}") from None

    def schema_version(self) -> int:
        from sqlalchemy import select

        with self.engine.connect() as c:
            return int(c.execute(select(self.meta.c.value).where(self.meta.c.key == "schema_version")).scalar())

    def set_setting(self, key: str, value) -> None:
        from sqlalchemy import delete, insert

        with self.engine.begin() as c:
            c.execute(delete(self.meta).where(self.meta.c.key == key))
            c.execute(insert(self.meta).values(key=key, value=json.dumps(value)))

    def setting(self, key: str, default=None):
        from sqlalchemy import select

        with self.engine.connect() as c:
            value = c.execute(select(self.meta.c.value).where(self.meta.c.key == key)).scalar()
        return default if value is None else json.loads(value)

    # -- items ----------------------------------------------------------------------------------------
    def add_items(self, candidates: list[Candidate]) -> int:
        """Store the candidates not stored yet (same prompt and responses = same item); returns how many."""
        from sqlalchemy import insert, select

        keyed = {}
        for cand in candidates:
            keyed.setdefault(_content_key(cand.prompt, cand.responses), cand)
        now = time.time()
        with self._lock, self.engine.begin() as c:
            known = set()
            keys = list(keyed)
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                known |= set(c.execute(select(self.items.c.content_key)
                                       .where(self.items.c.content_key.in_(chunk))).scalars())
            new = [{"content_key": key, "source": cand.source, "prompt": cand.prompt, "responses": cand.responses,
                    "label": cand.label, "scores": cand.scores, "created_at": now}
                   for key, cand in keyed.items() if key not in known]
            if new:
                c.execute(insert(self.items), new)
        return len(new)

    def item(self, item_id: int) -> Item:
        from sqlalchemy import select

        with self.engine.connect() as c:
            row = c.execute(select(self.items).where(self.items.c.id == item_id)).one()
        return _item(row)

    def all_items(self) -> dict[int, Item]:
        from sqlalchemy import select

        with self.engine.connect() as c:
            return {row.id: _item(row) for row in c.execute(select(self.items).order_by(self.items.c.id))}

    def count_items(self) -> int:
        from sqlalchemy import func, select

        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(self.items)).scalar())

    # -- annotators -----------------------------------------------------------------------------------
    def add_annotator(self, name: str, admin: bool = False, reset: bool = False) -> str:
        """A new token for `name` (a new annotator, or with `reset` a new token for one that exists: their old
        link stops working). Only the token's SHA-256 digest is stored; the token is returned once."""
        from sqlalchemy import insert, select, update

        name = name.strip()
        if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise UserError(f"an annotator's name must be 1 to {MAX_NAME_LENGTH} printable characters, got {name!r}")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with self._lock, self.engine.begin() as c:
            existing = c.execute(select(self.annotators.c.id).where(self.annotators.c.name == name)).scalar()
            if existing is not None and not reset:
                raise UserError(f'annotator "{name}" exists; --reset gives them a new token (the old link stops '
                                f"working)")
            if existing is None:
                c.execute(insert(self.annotators).values(name=name, token_hash=hash_token(token), admin=admin,
                                                         created_at=time.time()))
            else:
                c.execute(update(self.annotators).where(self.annotators.c.id == existing)
                          .values(token_hash=hash_token(token), admin=admin))
        return token

    def authenticate(self, token: str | None) -> Annotator | None:
        """The annotator holding `token`, or None. The lookup is by SHA-256 digest (its timing tells nothing
        about the token: changing one character of a guess changes the whole digest); the stored digest is
        then compared with `hmac.compare_digest`, in constant time."""
        from sqlalchemy import select

        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = hash_token(token)
        with self.engine.connect() as c:
            row = c.execute(select(self.annotators).where(self.annotators.c.token_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.token_hash.encode(), digest.encode()):
            return None
        return Annotator(row.id, row.name, bool(row.admin))

    def all_annotators(self) -> dict[int, Annotator]:
        from sqlalchemy import select

        with self.engine.connect() as c:
            rows = c.execute(select(self.annotators).order_by(self.annotators.c.id))
            return {row.id: Annotator(row.id, row.name, bool(row.admin)) for row in rows}

    # -- the queue ------------------------------------------------------------------------------------
    def current(self, annotator_id: int, overlap: int) -> Judgement | None:
        """The item this annotator is on: the one shown and not yet answered, else the next one of their queue
        (shown from now on, in a new random order), or None when nothing is left for them."""
        from sqlalchemy import delete, insert

        with self._lock, self.engine.begin() as c:
            shown = self._open(c, annotator_id)
            if shown is not None and self._done_count(c, shown.item_id) < overlap:
                return shown
            if shown is not None:  # others completed it meanwhile (after this one's hold ran out): it leaves
                c.execute(delete(self.judgements).where(self.judgements.c.id == shown.id))
            item_id = self._next_item(c, annotator_id, overlap)
            if item_id is None:
                return None
            k = len(c.execute(self.items.select().where(self.items.c.id == item_id)).one().responses)
            order = list(range(k))
            self._random.shuffle(order)
            c.execute(insert(self.judgements).values(
                item_id=item_id, annotator_id=annotator_id, status="open", display_order=order, ranks=None,
                comment="", unsafe=False, shown_at=time.time()))
            return self._open(c, annotator_id)

    def _open(self, c, annotator_id: int) -> Judgement | None:
        from sqlalchemy import select

        j = self.judgements
        row = c.execute(select(j).where(j.c.annotator_id == annotator_id, j.c.status == "open")
                        .order_by(j.c.shown_at, j.c.id).limit(1)).first()
        return None if row is None else _judgement(row)

    def _done_count(self, c, item_id: int) -> int:
        from sqlalchemy import func, select

        j = self.judgements
        return int(c.execute(select(func.count()).where(j.c.item_id == item_id, j.c.status == "done")).scalar())

    def _next_item(self, c, annotator_id: int, overlap: int) -> int | None:
        """The next of `_available`: those with the most judgements first (overlapping sets fill up), then in
        data order."""
        query, n_done = self._available(annotator_id, overlap)
        return c.execute(query.order_by(n_done.desc(), self.items.c.id).limit(1)).scalar()

    def _available(self, annotator_id: int, overlap: int):
        """(a query of the ids of the items this annotator may get next, their judgement counts): items they have
        not seen whose judgements, plus the annotators holding them on screen (shown in the last RESERVATION_S,
        not answered), are fewer than `overlap` — so that an item goes to exactly k people."""
        from sqlalchemy import func, select

        j, items = self.judgements, self.items
        done = (select(j.c.item_id, func.count().label("n")).where(j.c.status == "done")
                .group_by(j.c.item_id).subquery())
        held = (select(j.c.item_id, func.count().label("n"))
                .where(j.c.status == "open", j.c.annotator_id != annotator_id,
                       j.c.shown_at > time.time() - RESERVATION_S)
                .group_by(j.c.item_id).subquery())
        seen = select(j.c.item_id).where(j.c.annotator_id == annotator_id)
        n_done, n_held = func.coalesce(done.c.n, 0), func.coalesce(held.c.n, 0)
        query = (select(items.c.id)
                 .select_from(items.outerjoin(done, done.c.item_id == items.c.id)
                              .outerjoin(held, held.c.item_id == items.c.id))
                 .where(items.c.id.not_in(seen), n_done + n_held < overlap))
        return query, n_done

    def judgement(self, annotator_id: int, item_id: int) -> Judgement | None:
        from sqlalchemy import select

        j = self.judgements
        with self.engine.connect() as c:
            row = c.execute(select(j).where(j.c.annotator_id == annotator_id, j.c.item_id == item_id)).first()
        return None if row is None else _judgement(row)

    def last_done(self, annotator_id: int) -> Judgement | None:
        """The annotator's most recent judgement (the one they may still revise)."""
        with self.engine.connect() as c:
            return self._last_done(c, annotator_id)

    def _last_done(self, c, annotator_id: int) -> Judgement | None:
        from sqlalchemy import select

        j = self.judgements
        row = c.execute(select(j).where(j.c.annotator_id == annotator_id, j.c.status == "done")
                        .order_by(j.c.submitted_at.desc(), j.c.id.desc()).limit(1)).first()
        return None if row is None else _judgement(row)

    def submit(self, annotator_id: int, item_id: int, groups: object, comment: str = "",
               unsafe: bool = False) -> str:
        """Record a ranking (groups of display positions, best first; see `ranking`) of the annotator's current
        item ("submitted"), or replace their last judgement ("revised"). Raises InvalidRanking (nothing
        written) or Conflict (another item)."""
        from sqlalchemy import update

        with self._lock, self.engine.begin() as c:
            row = self._row(c, annotator_id, item_id)
            ranks = ranks_from_groups(groups, row.order)
            values = {"ranks": ranks, "comment": comment[:MAX_COMMENT_LENGTH], "unsafe": bool(unsafe)}
            if row.status == "open":
                values.update(status="done", submitted_at=time.time())
                outcome = "submitted"
            else:
                last = self._last_done(c, annotator_id)
                if row.status != "done" or last is None or last.id != row.id:
                    raise Conflict("only the item on screen and your last judgement can be changed")
                values.update(revised_at=time.time())
                outcome = "revised"
            c.execute(update(self.judgements).where(self.judgements.c.id == row.id).values(**values))
        return outcome

    def skip(self, annotator_id: int, item_id: int) -> None:
        """Take the annotator's current item out of their queue, unanswered (others still get it)."""
        from sqlalchemy import update

        with self._lock, self.engine.begin() as c:
            row = self._row(c, annotator_id, item_id)
            if row.status != "open":
                raise Conflict("only the item on screen can be skipped")
            c.execute(update(self.judgements).where(self.judgements.c.id == row.id)
                      .values(status="skipped", submitted_at=time.time()))

    def _row(self, c, annotator_id: int, item_id: int) -> Judgement:
        from sqlalchemy import select

        j = self.judgements
        row = c.execute(select(j).where(j.c.annotator_id == annotator_id, j.c.item_id == item_id)).first()
        if row is None:
            raise Conflict("this item is not in your queue")
        return _judgement(row)

    # -- progress -------------------------------------------------------------------------------------
    def progress(self, annotator_id: int, overlap: int) -> dict:
        """{done, skipped, left}: left counts the item on the annotator's screen and those they may get next
        (an item held on someone else's screen is not counted: it comes back only if they skip it)."""
        from sqlalchemy import func, select

        j = self.judgements
        with self.engine.connect() as c:
            counts = dict(c.execute(select(j.c.status, func.count()).where(j.c.annotator_id == annotator_id)
                                    .group_by(j.c.status)).all())
            query, _ = self._available(annotator_id, overlap)
            left = c.execute(select(func.count()).select_from(query.subquery())).scalar()
        return {"done": counts.get("done", 0), "skipped": counts.get("skipped", 0),
                "left": int(left) + min(counts.get("open", 0), 1)}

    def judgements_of(self, statuses: tuple[str, ...] = ("done",)) -> list[Judgement]:
        from sqlalchemy import select

        j = self.judgements
        with self.engine.connect() as c:
            rows = c.execute(select(j).where(j.c.status.in_(statuses)).order_by(j.c.item_id, j.c.id))
            return [_judgement(row) for row in rows]


def _engine(url: str, shown: str):
    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(connection, _record):
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")      # readers (stats, export) never block the server
                cursor.execute("PRAGMA synchronous=FULL")      # a commit is on disk before it returns
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError) as e:
        raise UserError(f"{shown}: not a database URL alignkit can use ({e})") from None
    except ImportError as e:
        raise UserError(f"{shown}: the database driver is not installed ({e}); e.g. pip install psycopg") from None
    return engine


def _safe_name(db: str) -> str:
    if "://" not in db:
        return db
    try:
        from sqlalchemy.engine import make_url

        return make_url(db).render_as_string(hide_password=True)
    except Exception:  # not even a URL: say so without echoing it
        return "the database URL"


def _reason(error) -> str:
    orig = getattr(error, "orig", None)
    return str(orig if orig is not None else error).splitlines()[0]


def _content_key(prompt, responses) -> str:
    text = json.dumps([prompt, responses], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _item(row) -> Item:
    return Item(row.id, row.source, row.prompt, list(row.responses), row.label,
                None if row.scores is None else list(row.scores))


def _judgement(row) -> Judgement:
    return Judgement(row.id, row.item_id, row.annotator_id, row.status, list(row.display_order),
                     None if row.ranks is None else list(row.ranks), row.comment, bool(row.unsafe), row.shown_at,
                     row.submitted_at, row.revised_at)

"""`alignkit annotate …`: serve the app, add annotators, export datasets, print statistics (SPEC §14).

    alignkit annotate --data CANDIDATES.jsonl --db FEEDBACK.sqlite [--port P] [--host H] [--overlap K]
    alignkit annotate add-annotator NAME --db FEEDBACK.sqlite [--admin] [--reset] [--port P | --url URL]
    alignkit annotate export --db FEEDBACK.sqlite --kind ranked|pairwise|unary --output FILE [--aggregate A]
    alignkit annotate stats --db FEEDBACK.sqlite [--json]

`--db` is a SQLite file (created on first use) or any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db.
"""

from __future__ import annotations

import argparse
import json
import signal

from alignkit.errors import UserError

DEFAULT_PORT = 8000
DB_HELP = "a SQLite file (created on first use) or an SQLAlchemy URL such as postgresql+psycopg://user@host/db"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    serve = argparse.ArgumentParser(
        prog="alignkit annotate", allow_abbrev=False,
        description="alignkit annotate: a web page on which people rank 2-4 candidate responses per prompt. "
                    "Sub-commands: add-annotator, export, stats (each with --help).")
    serve.add_argument("--data", nargs="+", default=[], metavar="CANDIDATES",
                       help="candidate files (rows: prompt, responses [2-4], optional label, scores); items "
                            "already in the database are not added twice")
    serve.add_argument("--db", required=True, help=DB_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                       "0.0.0.0 opens it to the network, see docs/annotate.md for TLS)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = a free one)")
    serve.add_argument("--overlap", type=int, default=1, metavar="K",
                       help="each item goes to K annotators (default 1; 2 or more measures agreement)")

    add = argparse.ArgumentParser(prog="alignkit annotate add-annotator", allow_abbrev=False,
                                  description="Add an annotator and print their token and link (the token is "
                                              "shown once; only its hash is stored).")
    add.add_argument("name", help="the annotator's name, as stats and the progress page show it")
    add.add_argument("--db", required=True, help=DB_HELP)
    add.add_argument("--admin", action="store_true", help="may also open the progress page (/progress)")
    add.add_argument("--reset", action="store_true", help="give an existing annotator a new token (the old link "
                     "stops working)")
    add.add_argument("--host", default="127.0.0.1", help="host in the printed link (default 127.0.0.1)")
    add.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port in the printed link (default {DEFAULT_PORT})")
    add.add_argument("--url", default=None, help="the app's public address for the link, e.g. "
                     "https://annotate.example.org/ (replaces --host and --port)")

    export = argparse.ArgumentParser(prog="alignkit annotate export", allow_abbrev=False,
                                     description="Write the judgements as a dataset that reward, dpo and kto read "
                                                 "as it is.")
    export.add_argument("--db", required=True, help=DB_HELP)
    export.add_argument("--kind", required=True, choices=["ranked", "pairwise", "unary"],
                        help="ranked (scores, ties kept), pairwise (every ordered pair) or unary (best desirable, "
                             "worst undesirable)")
    export.add_argument("--output", required=True, help="the JSONL file to write")
    export.add_argument("--aggregate", default="none", choices=["none", "majority", "plackett-luce"],
                        help="none: a row set per judgement (default); majority or plackett-luce: one per item, "
                             "from all its judgements")
    export.add_argument("--min-judgements", type=int, default=1, metavar="N",
                        help="only items with at least N judgements (default 1)")
    export.add_argument("--skip-flagged", action="store_true", help="leave out items anyone flagged as unsafe")

    stats = argparse.ArgumentParser(prog="alignkit annotate stats", allow_abbrev=False,
                                    description="Per-annotator counts and times, agreement (pairwise, Cohen's "
                                                "kappa, Krippendorff's alpha, Kendall's tau-b), position bias, "
                                                "agreement with the candidates' labels.")
    stats.add_argument("--db", required=True, help=DB_HELP)
    stats.add_argument("--metric", default="ordinal", choices=["ordinal", "interval", "nominal"],
                       help="Krippendorff's alpha metric over the ranks (default ordinal)")
    stats.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return {"serve": serve, "add-annotator": add, "export": export, "stats": stats}


def run_annotate(argv: list[str]) -> None:
    parsers = _parsers()
    command = argv[0] if argv and argv[0] in parsers else "serve"
    args = parsers[command].parse_args(argv[1:] if argv and argv[0] == command else argv)
    _check_installed(("sqlalchemy", "fastapi", "uvicorn", "jinja2") if command == "serve" else ("sqlalchemy",))
    {"serve": _serve, "add-annotator": _add_annotator, "export": _export, "stats": _stats}[command](args)


def _check_installed(modules: tuple[str, ...]) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"alignkit annotate needs {', '.join(missing)}: pip install \"alignkit[annotate]\"")


def link(base: str, token: str, page: str = "") -> str:
    return f"{base.rstrip('/')}/{page}?token={token}"


def _add_annotator(args) -> None:
    from alignkit.annotate.db import open_store

    store = open_store(args.db)
    token = store.add_annotator(args.name, admin=args.admin, reset=args.reset)
    base = args.url or f"http://{args.host}:{args.port}"
    print(f"annotator {args.name.strip()}{' (admin)' if args.admin else ''}")
    print(f"token: {token}")
    print(f"link: {link(base, token)}")
    if args.admin:
        print(f"progress: {link(base, token, 'progress')}")


def _export(args) -> None:
    from alignkit.annotate.db import open_store
    from alignkit.annotate.export import export

    done = export(open_store(args.db, must_exist=True), args.kind, args.output, aggregate=args.aggregate,
                  skip_flagged=args.skip_flagged, min_judgements=args.min_judgements)
    print(f"wrote {done['rows']} {args.kind} rows from {done['judgements']} judgements of {done['items']} items "
          f"to {args.output}")


def _stats(args) -> None:
    from alignkit.annotate.db import open_store
    from alignkit.annotate.stats import annotation_stats, format_stats

    report = annotation_stats(open_store(args.db, must_exist=True), metric=args.metric)
    print(json.dumps(report, indent=2) if args.json else format_stats(report))


def _serve(args) -> None:
    from alignkit.annotate.app import bind, build_app, uvicorn_server
    from alignkit.annotate.candidates import read_candidates
    from alignkit.annotate.db import open_store

    if args.overlap < 1:
        raise UserError(f"--overlap must be at least 1, got {args.overlap}")
    candidates = read_candidates(args.data) if args.data else []  # all checked before the database is touched
    store = open_store(args.db)
    added = store.add_items(candidates) if candidates else 0
    total = store.count_items()
    if total == 0:
        raise UserError(f"{store.shown}: holds no items yet; give --data CANDIDATES.jsonl")
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    new = f", {added} new" if args.data else ""
    print(f"alignkit annotate: {total} items{new}, each for {args.overlap} annotator"
          f"{'s' if args.overlap != 1 else ''}, on http://{host}:{port}/", flush=True)
    if not store.all_annotators():
        print(f"no annotators yet: alignkit annotate add-annotator NAME --db {args.db} --port {port}", flush=True)
    # uvicorn stops gracefully on SIGTERM and then re-raises it; this handler makes that a normal exit (0)
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn_server(build_app(store, args.overlap)).run(sockets=[sock])
    print("alignkit annotate: stopped", flush=True)

"""`alignkit annotate` (SPEC §14): a web app in which people rank candidate responses, and the tools that turn
their rankings into training data.

- `db`: the database (SQLAlchemy: SQLite by default, any URL such as PostgreSQL), items, annotators and
  their tokens, each annotator's queue and judgements.
- `app`: the FastAPI app (server-rendered page, a little JavaScript, a JSON API) and the serve command.
- `stats`: agreement between annotators (pairwise agreement, Cohen's κ, Krippendorff's α, Kendall's τ-b),
  position bias, agreement with the candidates' labels.
- `export`: judgements as ranked, pairwise or unary rows the trainers read, one per judgement or aggregated
  (majority, Plackett–Luce).
- `cli`: `alignkit annotate [serve] | add-annotator | export | stats`.
"""

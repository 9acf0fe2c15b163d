"""`alignkit serve`: an OpenAI-compatible HTTP server for a policy, optionally Best-of-N (SPEC §10).

`engine` batches concurrent requests into one generation on a worker thread; `app` is the FastAPI side
(fastapi and uvicorn are imported there only, when serving).
"""

"""`lmlab serve`: an OpenAI-compatible HTTP server over a continuous-batching engine.

The engine (`batcher`) needs only torch; the HTTP layer (`app`, `server`) needs the `serve`
extra (FastAPI + uvicorn) and is imported only when used."""

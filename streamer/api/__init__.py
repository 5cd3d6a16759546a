"""HTTP API of the streamer: routers in ``routes/``, shared dependencies in ``deps``."""

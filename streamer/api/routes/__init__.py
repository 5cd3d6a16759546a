"""Routers: contexts (upload, manifest, chunks, delete), sessions, profiles, health and metrics."""

from . import contexts, health, lookup, profiles, sessions

ROUTERS = (contexts.router, profiles.router, health.router, sessions.router, lookup.router)

"""Routers: contexts (upload, manifest, chunks, delete), profiles, health and metrics."""

from . import contexts, health, profiles

ROUTERS = (contexts.router, profiles.router, health.router)

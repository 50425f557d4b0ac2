"""Fixtures of the API tests (``api_world.py``): the app, two tenants, their data."""

from tests.unit.api_world import client, settings, world

__all__ = ["client", "settings", "world"]

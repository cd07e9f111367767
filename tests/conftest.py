"""Fixtures for every test module (none autouse): see ``tests/provenance_fixtures.py``."""

pytest_plugins = ["tests.provenance_fixtures"]

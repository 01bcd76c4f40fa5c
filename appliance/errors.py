"""The appliance's error types: a few well-named roots, each message naming the thing and the fix."""

from __future__ import annotations


class HomescaleError(Exception):
    """Root of every error homescale reports to a person (CLI exit code 2 unless stated)."""

    exit_code = 2


class ConfigError(HomescaleError):
    """The configuration file or an environment override is unusable."""


class StoreError(HomescaleError):
    """A store operation was refused; nothing was changed."""

    status = 400  # HTTP status the admin API answers with


class NotFound(StoreError):
    status = 404


class Conflict(StoreError):
    status = 409


class InvalidInput(StoreError):
    status = 400


class MigrationError(StoreError):
    """The database schema cannot be brought to this version of homescale."""

    status = 500

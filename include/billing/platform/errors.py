"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""


class BillingError(Exception):
    """A user-facing error: bad input, bad configuration or an unavailable service."""

    exit_code = 2


class ConfigError(BillingError):
    """Invalid configuration (catalog, policy, connection, CLI argument)."""


class ServiceError(BillingError):
    """A service could not be started, reached or stopped."""

    exit_code = 3


class RunRefused(BillingError):
    """A run would collide with another run of the same day (or with a live scheduler)."""

    exit_code = 4

"""The one error type the simulator, planner and calibrator raise for bad input.

The CLI turns it into a one-line message and exit code 2; library callers can catch it
(it is a ValueError, like fapool.config.ConfigError, which the CLI treats the same way).
"""

from __future__ import annotations


class SimInputError(ValueError):
    """Input the simulator cannot use: unknown model or hardware, a malformed trace row,
    an impossible SLO, a strategy that does not fit the model."""

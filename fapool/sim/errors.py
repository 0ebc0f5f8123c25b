"""The one error type the simulator, planner and calibrator raise for bad input."""


class SimInputError(ValueError):
    """Input the simulator cannot use; the CLI prints it as one line and exits with 2."""

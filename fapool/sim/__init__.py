"""Cost model, discrete-event cluster simulator and closed-form planner (docs/simulator.md)."""

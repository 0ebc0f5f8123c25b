"""Cost model, discrete-event cluster simulator and closed-form planner (docs/simulator.md).

CLI: `python -m fapool.sim.cli {plan,simulate,calibrate}`; `fapool.sim.cli.register` adds the
same subcommands to the main `fapool` CLI.
"""

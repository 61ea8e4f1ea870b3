"""Composition root: the `meterline` CLI, the embedded local stack and the process supervisor.

No domain logic lives here; it wires the components together."""

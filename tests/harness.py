"""Test helpers: the gloo world spawner lives in engine.spawn (tools use it too)."""
from engine.spawn import free_port, max_rel_diff, run_world  # noqa: F401

"""Patch (Ray): give a local Ray node's agents ports of their own while ray.init runs.

Why: the raylet waits a fixed 15 s for each agent port it has to discover (a port file the
agent writes once it has bound one), then aborts ("timed out during startup"). With several
Ray nodes on one machine (the default agent port 52365 is then taken) or a busy machine (the
agent's imports take longer) that wait is missed. A port given up front is used as it is, but
ray.init has no parameter for these.
How: for the length of a `with fixed_agent_ports():` block, ray._private.parameter.RayParams
.__init__ is wrapped to fill the agents' port fields with free loopback ports; restored after.
Delete when: ray.init accepts the agents' ports (or the raylet waits for the agent as long as
agent_register_timeout_ms says).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

from ray._private import parameter

from streamsink.errors import PatchTargetMoved
from streamsink.patches import check_ray_version
from streamsink.patches._install import require, undo, wrap

FIELDS = ("metrics_agent_port", "dashboard_agent_listen_port", "runtime_env_agent_port")


def check_target() -> None:
    check_ray_version()
    params = inspect.signature(require(parameter.RayParams, "__init__")).parameters
    missing = [f for f in FIELDS if f not in params]
    if missing:
        raise PatchTargetMoved(f"ray RayParams no longer takes {', '.join(missing)}")


def _init_with_ports(ports: dict, original, params, *args, **kwargs):
    original(params, *args, **kwargs)
    for field, port in ports.items():
        if not getattr(params, field, None) or field == "dashboard_agent_listen_port":
            setattr(params, field, port)


@contextlib.contextmanager
def fixed_agent_ports(free_port):
    """Within the block, every RayParams gets free_port() for the agent ports it leaves
    unset (the dashboard agent's listen port always: its default is a fixed number)."""
    check_target()
    ports = {field: free_port() for field in FIELDS}
    wrap(parameter.RayParams, "__init__", functools.partial(_init_with_ports, ports))
    try:
        yield ports
    finally:
        undo(parameter.RayParams, "__init__")

"""Connecting the library's jobs to Ray."""

from __future__ import annotations

import os


def ensure_ray() -> bool:
    """Connect to Ray: the job's cluster under ``ray job submit`` (``RAY_ADDRESS`` set), else a
    new local instance of our own (even if a ``ray start`` cluster runs on this machine),
    with more logical CPUs than cores, so actor pools and training workers do not starve
    Ray Data's read tasks. Returns True when this call started Ray (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    else:
        ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)))
    return True

"""Connect to Ray: a running cluster when given an address, else a small local one started here.

Joining a cluster (README "Scaling out on Ray"): on the head machine ``ray start --head --port=6379``, on each
other machine ``ray start --address=<head-ip>:6379``, then run the command on any of them with
``--ray-address=auto`` (or from outside the cluster with ``--ray-address=ray://<head-ip>:10001``, Ray Client).
Ray 2.60's ``ray start --head`` turns on token authentication: every other machine and every driver needs the
head's ``~/.ray/auth_token`` and ``RAY_AUTH_MODE=token`` (measured here: without them the join is refused).
"""

from __future__ import annotations

import os
from typing import Any

from robofinetune.errors import ConfigError

#: Object store of a local cluster. Env workers send small observation dicts and the learner puts a few MB of
#: weights, so Ray's default (30% of RAM) would only take memory from the simulators.
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


def import_ray() -> Any:
    """``ray``, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ConfigError("Ray env workers need the `ray` package: pip install 'robofinetune[ray]' "
                          f"(or pip install 'ray==2.*'); import failed: {error}") from error
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; return True when this call started or joined it (the caller
    then shuts it down with ``ray.shutdown()`` when done), False when Ray was already initialised.

    ``address`` None or "": a local cluster in this machine with no dashboard, a small object store and
    ``num_cpus`` (default: the machine's cores). "auto": the cluster ``ray start`` runs on this machine.
    "ray://host:port": a remote cluster through Ray Client. Anything else is passed to ``ray.init`` as is.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as error:
            raise ConfigError(f"ray_address {address!r}: could not connect ({error}). Is a cluster running there "
                              f"(`ray start --head`)? One started by `ray start` checks a token: copy the head's "
                              f"~/.ray/auth_token here and set RAY_AUTH_MODE=token (README, Scaling out on Ray). "
                              f"Or leave ray_address empty for a local Ray") from error
        return True
    try:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=True)
    except BaseException:
        ray.shutdown()   # a start that failed half way (e.g. timed out on a loaded machine) leaves no raylet behind
        raise
    return True

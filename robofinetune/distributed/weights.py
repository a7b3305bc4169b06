"""Policy weights from the learner to the workers through Ray's object store, and how stale the workers' data is.

The learner calls ``broadcaster.maybe_publish(updates, module)`` after each update; every ``every`` updates the
module's weights go into the object store once (``ray.put``, numpy arrays, which workers on the same node read
without a copy) and a small Ray actor, the :class:`WeightStore`, keeps the reference of the newest version only.
A worker that runs the policy holds a :class:`WeightSubscriber` and calls ``poll()`` between steps: it fetches
the newest weights only when their version changed. The version is the learner's update count at publication;
a worker tags each transition with the version it acted with, and :class:`StalenessLog` turns those tags into
"learner updates between the weights a transition was collected with and now" when the learner receives it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from robofinetune.distributed.cluster import import_ray


class WeightStore:
    """Ray actor: the newest (version, object reference) pair. The reference travels inside a list so that
    Ray hands the reference itself to the store, not the weights it points to."""

    def __init__(self) -> None:
        self.version = -1
        self.ref: list[Any] = []

    def publish(self, version: int, ref: list[Any]) -> None:
        if version > self.version:   # a late publish of an older version never replaces a newer one
            self.version, self.ref = version, ref

    def latest(self, known_version: int) -> tuple[int, list[Any]] | None:
        """(version, [ref]) when newer than ``known_version``, else None (nothing to fetch)."""
        return (self.version, self.ref) if self.version > known_version else None


def state_to_numpy(module: Any) -> dict[str, np.ndarray]:
    """A torch module's (or state dict's) tensors as numpy arrays on the CPU: cheap to store and read in Ray."""
    state = module.state_dict() if hasattr(module, "state_dict") else module
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in state.items()}


def load_numpy_state(module: Any, state: dict[str, np.ndarray]) -> None:
    """Load :func:`state_to_numpy`'s output into a torch module (on whatever device the module is on)."""
    import torch

    module.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in state.items()})


class WeightBroadcaster:
    """Learner side: publish the weights every ``every`` learner updates (module docstring)."""

    def __init__(self, every: int, store: Any | None = None) -> None:
        if every < 1:
            raise ValueError(f"weights are broadcast every `every` >= 1 learner updates, got {every}")
        self._ray = import_ray()
        self.every = every
        self.store = store if store is not None else self._ray.remote(WeightStore).options(num_cpus=0).remote()
        self.version = -1
        self.publications = 0

    def maybe_publish(self, updates: int, module: Any) -> bool:
        """Publish when ``updates`` reached the next multiple of ``every`` since the last publication (or nothing
        was published yet); True when it did."""
        if self.version >= 0 and updates - self.version < self.every:
            return False
        self.publish(updates, module)
        return True

    def publish(self, updates: int, module: Any) -> None:
        ref = self._ray.put(state_to_numpy(module))
        # wait for the store to hold it, so a worker polling after this returns sees this version
        self._ray.get(self.store.publish.remote(updates, [ref]))
        self.version = updates
        self.publications += 1


class WeightSubscriber:
    """Worker side: ``poll()`` returns the newest weights once per new version, else None."""

    def __init__(self, store: Any) -> None:
        self._ray = import_ray()
        self.store = store
        self.version = -1   # the version of the weights this worker acts with (-1: none received yet)

    def poll(self) -> dict[str, np.ndarray] | None:
        latest = self._ray.get(self.store.latest.remote(self.version))
        if latest is None:
            return None
        version, (ref,) = latest
        state = self._ray.get(ref)
        self.version = version
        return state


class StalenessLog:
    """Learner updates between the weights each transition was collected with and the learner's count when it
    arrived: mean and max since the last ``summary(reset=True)``, for the run's metrics."""

    def __init__(self) -> None:
        self._sum = 0.0
        self._count = 0
        self._max = 0

    def record(self, versions: np.ndarray, learner_updates: int) -> np.ndarray:
        """Count a batch of transitions tagged with ``versions``; return their staleness."""
        staleness = learner_updates - np.asarray(versions, np.int64)
        if np.any(staleness < 0):
            raise ValueError(f"a transition tagged with weights version {int(np.max(versions))} arrived when the "
                             f"learner had made only {learner_updates} updates")
        self._sum += float(staleness.sum())
        self._count += int(staleness.size)
        self._max = max(self._max, int(staleness.max(initial=0)))
        return staleness

    def summary(self, reset: bool = True) -> dict[str, float]:
        result = {"staleness_mean": self._sum / self._count if self._count else 0.0,
                  "staleness_max": float(self._max), "staleness_transitions": float(self._count)}
        if reset:
            self._sum, self._count, self._max = 0.0, 0, 0
        return result

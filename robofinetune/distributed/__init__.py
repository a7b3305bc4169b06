"""Scaling out on Ray: env workers as Ray actors, and policy weights through Ray's object store.

- :func:`init_ray` joins a cluster (``address="auto"`` or ``"ray://host:port"``) or starts a local one with no
  dashboard; what the commands call before they make Ray actors.
- :class:`RayVectorEnv` (``make_vector_env(task, n, backend="ray")``): the project's SAME_STEP vector env whose
  environments live in ``num_workers`` Ray actors; a killed actor is restarted and its episodes are aborted.
- :class:`WeightBroadcaster`: the learner puts its weights in the object store every K updates; workers that run
  the policy fetch the latest, and the learner-update staleness of each transition is counted.
- :class:`RayPolicyRollout` (``train residual --rollout-in-workers``): env workers that also run the residual
  policy's rollout (:class:`ResidualRolloutWorker`) and send replay rows, with the weights broadcast to them.
- :class:`RobotActor` / :class:`RobotActorLink`: residual RL on hardware, a free-running actor on the robot's
  machine (its control loop never waits for the learner) that a learner drains rows from and sends weights to.

Ray is an optional dependency (``pip install robofinetune[ray]``); importing this package does not import it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["init_ray", "RayVectorEnv", "EnvWorkerError", "WeightBroadcaster", "WeightSubscriber", "StalenessLog",
           "RayPolicyRollout", "ResidualRolloutWorker", "RobotActor", "RobotActorLink", "RobotActorSpec",
           "RobotActorStats", "RobotActorError"]


def __getattr__(name: str) -> Any:
    # ray takes ~1 s to import: only when something of this package is used
    if name == "init_ray":
        from robofinetune.distributed.cluster import init_ray

        return init_ray
    if name in ("RayVectorEnv", "EnvWorkerError"):
        from robofinetune.distributed import ray_envs

        return getattr(ray_envs, name)
    if name in ("WeightBroadcaster", "WeightSubscriber", "StalenessLog"):
        from robofinetune.distributed import weights

        return getattr(weights, name)
    if name in ("RayPolicyRollout", "ResidualRolloutWorker"):
        from robofinetune.distributed import policy_workers

        return getattr(policy_workers, name)
    if name in ("RobotActor", "RobotActorLink", "RobotActorSpec", "RobotActorStats", "RobotActorError"):
        from robofinetune.distributed import robot_actor

        return getattr(robot_actor, name)
    raise AttributeError(f"module 'robofinetune.distributed' has no attribute {name!r}")

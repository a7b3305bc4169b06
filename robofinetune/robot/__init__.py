"""The real-robot stack: the same Env interface over ROS, a safety layer, the deploy loop, teleop and the recorder.

* :class:`RobotEnv` (``robot.env``): a ``gymnasium.Env`` for a robot YAML (``real_robot/*.yaml``) with the
  observation/action spaces of the sim task it mirrors; :func:`make_robot_env` is ``make_env`` for robots.
* transports (``robot.transport``): ROS 1 through rospy, rosbridge (ROS 1/2) through roslibpy.
* safety (``robot.safety``): per-command filter, stale-observation watchdog, fixed-rate loop.
* ``robot.runner.run_policy`` (deploy), ``robot.recorder.record_session`` (teleop recording),
  ``robot.teleop`` (keyboard, SpaceMouse, ROS topic), ``robot.cli`` (the ``deploy`` and ``record`` commands).
* ``real_robot/mujoco_twin_node.py``: the MuJoCo twin that stands in for the hardware.
"""

from typing import Any

__all__ = ["RobotConfig", "RobotEnv", "SafetyConfig", "SafetyLayer", "load_robot_config", "make_robot_env",
           "is_robot_config", "robot_task_spec", "run_policy", "record_session"]

_LAZY = {
    "RobotConfig": "robofinetune.robot.config",
    "load_robot_config": "robofinetune.robot.config",
    "is_robot_config": "robofinetune.robot.config",
    "robot_task_spec": "robofinetune.robot.config",
    "RobotEnv": "robofinetune.robot.env",
    "make_robot_env": "robofinetune.robot.env",
    "SafetyConfig": "robofinetune.robot.safety",
    "SafetyLayer": "robofinetune.robot.safety",
    "run_policy": "robofinetune.robot.runner",
    "record_session": "robofinetune.robot.recorder",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'robofinetune.robot' has no attribute {name!r}")

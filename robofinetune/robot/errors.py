"""Errors of the real-robot stack. All are RobofinetuneErrors, so the CLI reports them without a traceback."""

from robofinetune.errors import ConfigError, RobofinetuneError


class RobotConfigError(ConfigError):
    """A robot YAML is missing a field or has a wrong one (the message names the file and the field)."""


class RobotError(RobofinetuneError):
    """The robot (or its ROS graph) does not behave as the config says: no master, no messages, no reset."""


class RobotConnectionError(RobotError):
    """No ROS master / rosbridge server, or a topic that never delivers."""


class EStopError(RobotError):
    """The e-stop is engaged: nothing moves until it is released (topic false / restart)."""

"""Errors users see. Each names the file and the field that is wrong, so nobody debugs a torch shape error."""


class RobofinetuneError(Exception):
    """Base class: a problem in the user's input (data, checkpoint, config, task), not a bug."""


class DatasetError(RobofinetuneError):
    """A dataset file is missing, corrupt, truncated, or lacks a field the caller needs."""


class CheckpointError(RobofinetuneError):
    """A checkpoint is unreadable or was made for another task / observation layout."""


class ConfigError(RobofinetuneError):
    """A config key or value is unknown or has the wrong type."""


class TaskError(RobofinetuneError):
    """An unknown task name, or an observation that does not match the task's spec."""

"""Third-party chatter kept off the terminal: robosuite's import warnings (no private macro file, robosuite_models
missing, mink IK not loadable) and its INFO line per env process say nothing a user can act on.

robosuite logs through the ``robosuite_logs`` logger, to which it adds a console handler when imported.
:func:`import_robosuite` imports it holding those records back, then routes the logger:

- to the file named by ``ROBOFINETUNE_LOG_FILE`` (every record; the CLI points it at ``<run>/robosuite.log``),
- to the terminal only at ERROR and above, or everything when ``ROBOFINETUNE_VERBOSE=1`` (``--verbose``).

Both settings are environment variables because env worker processes (fork, forkserver or spawn) inherit the
environment and import robosuite themselves.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import ModuleType

LOG_FILE_ENV = "ROBOFINETUNE_LOG_FILE"
VERBOSE_ENV = "ROBOFINETUNE_VERBOSE"
ROBOSUITE_LOGGER = "robosuite_logs"
LOG_FILE_NAME = "robosuite.log"
#: What robosuite may still print on the terminal without --verbose.
QUIET_CONSOLE_LEVEL = logging.ERROR


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def log_file() -> Path | None:
    value = os.environ.get(LOG_FILE_ENV, "")
    return Path(value) if value else None


def set_verbose(flag: bool) -> None:
    if flag:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
    _reconfigure_if_imported()


def set_log_file(path: str | Path | None) -> None:
    """Send robosuite's records (this process and env processes started from now on) to ``path``."""
    if path:
        os.environ[LOG_FILE_ENV] = str(Path(path).resolve())
    else:
        os.environ.pop(LOG_FILE_ENV, None)
    _reconfigure_if_imported()


def snapshot() -> dict[str, str | None]:
    """The current settings, for :func:`restore` (the CLI restores them when a command returns)."""
    return {name: os.environ.get(name) for name in (LOG_FILE_ENV, VERBOSE_ENV)}


def restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _reconfigure_if_imported()


class _HoldRecords(logging.Filter):
    """Keeps the records logged while robosuite imports (before its logger can be routed) for replay."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def import_robosuite() -> ModuleType:
    """``import robosuite`` with its logger routed as the module docstring says."""
    if "robosuite" in sys.modules:
        return sys.modules["robosuite"]
    logger = logging.getLogger(ROBOSUITE_LOGGER)
    hold = _HoldRecords()
    logger.addFilter(hold)
    try:
        import robosuite
    finally:
        logger.removeFilter(hold)
        configure_robosuite_logging()
        for record in hold.records:
            logger.handle(record)
    return robosuite


class _TerminalHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and tqdm swap it), like logging's last resort."""

    def __init__(self, level: int) -> None:
        logging.Handler.__init__(self, level)

    @property
    def stream(self):  # noqa: D102 - StreamHandler reads self.stream
        return sys.stderr


def configure_robosuite_logging() -> None:
    """(Re)route the robosuite logger from the current settings: replaces robosuite's own console handler and
    any handler installed here before; handlers added by anyone else stay."""
    logger = logging.getLogger(ROBOSUITE_LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, "_robofinetune", False) or _is_robosuite_console(handler):
            logger.removeHandler(handler)
            handler.close()
    console = _TerminalHandler(logging.NOTSET if verbose() else QUIET_CONSOLE_LEVEL)
    console.setFormatter(logging.Formatter("[robosuite %(levelname)s] %(message)s (%(filename)s:%(lineno)d)"))
    handlers: list[logging.Handler] = [console]
    path = log_file()
    if path is not None:
        file_handler = logging.FileHandler(path, mode="a", delay=True, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(
            "%(asctime)s pid %(process)d [robosuite %(levelname)s] %(message)s (%(filename)s:%(lineno)d)"))
        handlers.append(file_handler)
    for handler in handlers:
        handler._robofinetune = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def _is_robosuite_console(handler: logging.Handler) -> bool:
    formatter = type(handler.formatter)
    return (type(handler) is logging.StreamHandler and formatter.__name__ == "ConsoleFormatter"
            and formatter.__module__.startswith("robosuite"))


def _reconfigure_if_imported() -> None:
    if "robosuite" in sys.modules:
        configure_robosuite_logging()

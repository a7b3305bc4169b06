"""Start and stop a ROS 1 master on loopback (tests, benchmarks, dry runs).

rospy allows one node per process and binds it to the master it first registered with, so a process must use
one master for its whole life: :func:`session_master` returns that master (the running one named by
``ROS_MASTER_URI`` when it answers, else one started on a free loopback port and stopped at exit).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from robofinetune.robot.errors import RobotConnectionError, RobotError
from robofinetune.robot.transport import ROS_APT_PACKAGES, master_online


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RosMaster:
    """``roscore -p PORT`` in its own process group, logging under a temporary folder."""

    def __init__(self, port: int | None = None, log_dir: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="robofinetune-ros-"))
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for nodes that use this master (loopback only)."""
        return {"ROS_MASTER_URI": self.uri, "ROS_IP": "127.0.0.1", "ROS_HOME": str(self.log_dir),
                "ROS_LOG_DIR": str(self.log_dir / "log")}

    def start(self, timeout: float = 30.0) -> RosMaster:
        if shutil.which("roscore") is None:
            raise RobotError(f"roscore not found; install ROS 1: apt-get install {ROS_APT_PACKAGES}")
        environment = {**os.environ, **self.env}
        environment.pop("ROS_HOSTNAME", None)
        log = open(self.log_dir / "roscore.log", "ab")
        self.process = subprocess.Popen(["roscore", "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT,
                                        env=environment, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not master_online(self.uri, timeout=0.5):
            if self.process.poll() is not None:
                raise RobotConnectionError(f"roscore exited with code {self.process.returncode}; "
                                           f"see {self.log_dir / 'roscore.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RobotConnectionError(f"roscore did not come up on {self.uri} within {timeout:g} s")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        self._kill(process)
        if self._own_log_dir and not os.environ.get("ROBOFINETUNE_KEEP_ROS_LOGS"):
            shutil.rmtree(self.log_dir, ignore_errors=True)

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGINT)  # roscore shuts rosmaster and rosout down on SIGINT
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=5)


_SESSION: RosMaster | None = None


def session_master() -> str:
    """The master URI this process uses; starts one (and sets ``ROS_MASTER_URI``/``ROS_IP``) if none answers."""
    global _SESSION
    uri = os.environ.get("ROS_MASTER_URI")
    if _SESSION is not None:
        return _SESSION.uri
    if uri and master_online(uri):
        os.environ.setdefault("ROS_IP", "127.0.0.1")
        return uri
    _SESSION = RosMaster().start()
    os.environ.update(_SESSION.env)
    os.environ.pop("ROS_HOSTNAME", None)
    atexit.register(_SESSION.stop)
    return _SESSION.uri

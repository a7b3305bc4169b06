"""Transports: how the robot code talks to ROS. Both hand messages over in the dict form of
:mod:`robofinetune.robot.messages` and stamp each with its receipt time (``time.monotonic()``).

* :class:`RospyTransport`: ROS 1 through ``rospy`` (Debian's ``python3-rospy``; from a virtualenv it is found by
  appending ``/usr/lib/python3/dist-packages`` to ``sys.path``, see :func:`import_rospy`).
* :class:`RoslibpyTransport`: a rosbridge server (ROS 1 or ROS 2) through ``roslibpy`` over a websocket.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

from robofinetune.robot.errors import RobotConnectionError, RobotError
from robofinetune.robot.messages import (dict_to_rospy, from_rosbridge, rospy_to_dict, rosbridge_type,
                                         to_rosbridge)

Callback = Callable[[dict[str, Any], float], None]

# Where Debian (python3-rospy) and ROS 1 binary installs put the Python packages.
ROS_PYTHON_PATHS = ("/usr/lib/python3/dist-packages", "/opt/ros/noetic/lib/python3/dist-packages")
ROS_APT_PACKAGES = "ros-core python3-rospy python3-sensor-msgs python3-geometry-msgs python3-std-msgs"


def import_rospy():
    """``import rospy``, from a virtualenv too (appends the system ROS paths to ``sys.path``, after the venv's)."""
    import importlib

    try:
        return importlib.import_module("rospy")
    except ImportError:
        for path in ROS_PYTHON_PATHS:
            if os.path.isdir(os.path.join(path, "rospy")) and path not in sys.path:
                sys.path.append(path)
        try:
            return importlib.import_module("rospy")
        except ImportError as exc:
            raise RobotError(f"rospy is not importable ({exc}); install ROS 1: apt-get install {ROS_APT_PACKAGES}"
                             ) from None


def ros_available() -> bool:
    """True when rospy can be imported and ``roscore`` is on the PATH."""
    import shutil

    try:
        import_rospy()
    except RobotError:
        return False
    return shutil.which("roscore") is not None


def master_online(uri: str | None = None, timeout: float = 1.0) -> bool:
    import_rospy()
    import socket

    import rosgraph

    uri = uri or rosgraph.get_master_uri()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        return bool(rosgraph.is_master_online(master_uri=uri))
    except Exception:  # noqa: BLE001 - any failure to reach the master means it is not online
        return False
    finally:
        socket.setdefaulttimeout(previous)


class Subscription(ABC):
    @abstractmethod
    def close(self) -> None: ...


class Publisher(ABC):
    @abstractmethod
    def publish(self, message: dict[str, Any]) -> float:
        """Send the message; return ``time.monotonic()`` at hand-off to the transport."""

    def subscriber_count(self) -> int | None:
        """Connected subscribers, when the transport can tell (rospy can, rosbridge cannot)."""
        return None

    @abstractmethod
    def close(self) -> None: ...


class Transport(ABC):
    name = "transport"

    @abstractmethod
    def connect(self, node_name: str) -> None: ...

    @abstractmethod
    def subscribe(self, topic: str, msg_type: str, callback: Callback, queue_size: int = 10) -> Subscription: ...

    @abstractmethod
    def publisher(self, topic: str, msg_type: str, latch: bool = False, queue_size: int = 10) -> Publisher: ...

    @abstractmethod
    def close(self) -> None: ...

    def wait_for_subscribers(self, publisher: Publisher, timeout: float = 3.0, count: int = 1) -> bool:
        """Wait until ``publisher`` has subscribers (messages published before a subscriber connects are lost)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            connected = publisher.subscriber_count()
            if connected is None:
                time.sleep(min(0.3, timeout))  # no way to tell: give the bridge a moment
                return True
            if connected >= count:
                return True
            time.sleep(0.01)
        return False


# --- rospy -----------------------------------------------------------------------------------------------------


class _RospySubscription(Subscription):
    def __init__(self, subscriber: Any) -> None:
        self._subscriber = subscriber

    def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.unregister()
            self._subscriber = None


class _RospyPublisher(Publisher):
    def __init__(self, publisher: Any, message_class: type) -> None:
        self._publisher = publisher
        self._class = message_class
        self._lock = threading.Lock()

    def publish(self, message: dict[str, Any]) -> float:
        ros_message = dict_to_rospy(self._class, message)
        with self._lock:
            sent = time.monotonic()
            self._publisher.publish(ros_message)
        return sent

    def subscriber_count(self) -> int | None:
        return int(self._publisher.get_num_connections())

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.unregister()
            self._publisher = None


class RospyTransport(Transport):
    """ROS 1 through rospy. One rospy node per process (rospy's rule): a second transport reuses it."""

    name = "rospy"

    def __init__(self, master_uri: str | None = None, connect_timeout: float = 5.0) -> None:
        self.master_uri = master_uri
        self.connect_timeout = connect_timeout
        self._handles: list[Any] = []

    def connect(self, node_name: str) -> None:
        rospy = import_rospy()
        if self.master_uri:
            os.environ["ROS_MASTER_URI"] = self.master_uri
        import rosgraph

        uri = rosgraph.get_master_uri()
        deadline = time.monotonic() + self.connect_timeout
        while not master_online(uri):
            if time.monotonic() > deadline:
                raise RobotConnectionError(f"no ROS master at {uri} (ROS_MASTER_URI); start one with `roscore` "
                                           f"(or scripts/ci_ros.sh start)")
            time.sleep(0.2)
        if not rospy.core.is_initialized():
            # disable_signals: the caller (CLI, tests) keeps its own Ctrl-C handling, and init may run off the
            # main thread
            rospy.init_node(node_name, anonymous=True, disable_signals=True)

    def subscribe(self, topic: str, msg_type: str, callback: Callback, queue_size: int = 10) -> Subscription:
        rospy = import_rospy()
        message_class = _message_class(msg_type)

        def receive(message: Any) -> None:
            received = time.monotonic()
            callback(rospy_to_dict(message), received)

        # tcp_nodelay: without it Nagle's algorithm delays small messages by up to ~40 ms
        subscriber = rospy.Subscriber(topic, message_class, receive, queue_size=queue_size, tcp_nodelay=True)
        handle = _RospySubscription(subscriber)
        self._handles.append(handle)
        return handle

    def publisher(self, topic: str, msg_type: str, latch: bool = False, queue_size: int = 10) -> Publisher:
        rospy = import_rospy()
        message_class = _message_class(msg_type)
        handle = _RospyPublisher(rospy.Publisher(topic, message_class, queue_size=queue_size, latch=latch),
                                 message_class)
        self._handles.append(handle)
        return handle

    def close(self) -> None:
        # unregister only: rospy cannot re-initialise a node in the same process after shutdown
        for handle in self._handles:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - best effort during teardown
                pass
        self._handles.clear()


def _message_class(msg_type: str) -> type:
    import_rospy()
    import roslib.message

    from robofinetune.robot.messages import canonical_type

    message_class = roslib.message.get_message_class(canonical_type(msg_type))
    if message_class is None:
        raise RobotError(f"ROS message type '{msg_type}' is not installed (Debian package python3-<pkg>-msgs)")
    return message_class


# --- roslibpy (rosbridge) --------------------------------------------------------------------------------------


class _RoslibpySubscription(Subscription):
    def __init__(self, topic: Any) -> None:
        self._topic = topic

    def close(self) -> None:
        if self._topic is not None:
            self._topic.unsubscribe()
            self._topic = None


class _RoslibpyPublisher(Publisher):
    def __init__(self, topic: Any, msg_type: str, ros_version: int) -> None:
        self._topic = topic
        self._type = msg_type
        self._ros_version = ros_version

    def publish(self, message: dict[str, Any]) -> float:
        import roslibpy

        payload = roslibpy.Message(to_rosbridge(self._type, message, self._ros_version))
        sent = time.monotonic()
        self._topic.publish(payload)
        return sent

    def close(self) -> None:
        if self._topic is not None:
            self._topic.unadvertise()
            self._topic = None


class RoslibpyTransport(Transport):
    """A rosbridge v2 server (``rosbridge_websocket`` on the robot, ROS 1 or ROS 2) through roslibpy."""

    name = "rosbridge"

    def __init__(self, host: str = "127.0.0.1", port: int = 9090, ros_version: int = 1,
                 connect_timeout: float = 10.0) -> None:
        self.host, self.port, self.ros_version = host, port, ros_version
        self.connect_timeout = connect_timeout
        self.ros: Any = None
        self._handles: list[Any] = []

    def connect(self, node_name: str) -> None:
        import roslibpy

        self.ros = roslibpy.Ros(host=self.host, port=self.port)
        try:
            self.ros.run(timeout=self.connect_timeout)
        except Exception as exc:  # noqa: BLE001 - roslibpy raises its own timeout types
            raise RobotConnectionError(f"no rosbridge server at ws://{self.host}:{self.port} ({exc})") from None

    def subscribe(self, topic: str, msg_type: str, callback: Callback, queue_size: int = 10) -> Subscription:
        import roslibpy

        handle_topic = roslibpy.Topic(self.ros, topic, rosbridge_type(msg_type, self.ros_version),
                                      queue_length=queue_size)

        def receive(message: dict[str, Any]) -> None:
            received = time.monotonic()
            callback(from_rosbridge(msg_type, message), received)

        handle_topic.subscribe(receive)
        handle = _RoslibpySubscription(handle_topic)
        self._handles.append(handle)
        return handle

    def publisher(self, topic: str, msg_type: str, latch: bool = False, queue_size: int = 10) -> Publisher:
        import roslibpy

        handle_topic = roslibpy.Topic(self.ros, topic, rosbridge_type(msg_type, self.ros_version), latch=latch,
                                      queue_size=queue_size)
        handle_topic.advertise()
        handle = _RoslibpyPublisher(handle_topic, msg_type, self.ros_version)
        self._handles.append(handle)
        return handle

    def close(self) -> None:
        for handle in self._handles:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - best effort during teardown
                pass
        self._handles.clear()
        if self.ros is not None:
            try:
                self.ros.close()
            except Exception:  # noqa: BLE001
                pass
            self.ros = None


def make_transport(config: Any) -> Transport:
    """The transport a :class:`robofinetune.robot.config.RobotConfig` asks for."""
    if config.transport == "rospy":
        return RospyTransport()
    if config.transport == "rosbridge":
        return RoslibpyTransport(config.rosbridge_host, config.rosbridge_port, config.ros_version)
    raise RobotError(f"unknown transport '{config.transport}'")

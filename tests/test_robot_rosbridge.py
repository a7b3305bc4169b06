"""The rosbridge transport (roslibpy) end to end.

No rosbridge server installs here, so this test runs a small relay that speaks the rosbridge v2 protocol's topic
operations (advertise, publish, subscribe, unsubscribe, unadvertise) over a real websocket and forwards them to
the real roscore through rospy. RobotEnv then drives the (rospy) twin through roslibpy -> websocket -> relay ->
ROS, exercising roslibpy's client and the JSON conversions on the wire. A real rosbridge server on a robot
speaks the same operations.
"""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

from robofinetune.robot.transport import ros_available

try:  # test extras; a missing one skips each test (so that CI, which requires ROS tests to run, notices)
    import roslibpy  # noqa: F401
    import websockets
except ImportError as missing:
    websockets, _missing_package = None, str(missing)
else:
    _missing_package = ""

pytestmark = [pytest.mark.ros,
              pytest.mark.skipif(not ros_available(), reason="ROS 1 is not installed; CI installs it"),
              pytest.mark.skipif(bool(_missing_package), reason=f"{_missing_package} (pip install -e .[test])")]


class RosbridgeRelay:
    """Topic operations of the rosbridge v2 protocol, relayed to ROS 1 via rospy (one process-wide node)."""

    def __init__(self) -> None:
        self.port = None
        self.ready = threading.Event()
        self.operations: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RosbridgeRelay:
        from robofinetune.robot.transport import RospyTransport

        RospyTransport().connect("rosbridge_relay")
        self._thread.start()
        assert self.ready.wait(10)
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve

        self._stop = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", 0) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self.ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=5)

    async def _handle(self, websocket) -> None:
        import rospy

        from robofinetune.robot.messages import dict_to_rospy, rospy_to_dict, to_rosbridge
        from robofinetune.robot.transport import _message_class

        loop = asyncio.get_running_loop()
        publishers, subscribers = {}, {}

        def forward(topic: str, msg_type: str):
            def callback(message) -> None:
                text = json.dumps({"op": "publish", "topic": topic, "msg": to_rosbridge(msg_type, rospy_to_dict(message))})
                asyncio.run_coroutine_threadsafe(websocket.send(text), loop)
            return callback

        try:
            async for text in websocket:
                request = json.loads(text)
                op, topic = request.get("op"), request.get("topic")
                self.operations.append(op)
                if op == "advertise" and topic not in publishers:
                    message_class = _message_class(request["type"])
                    publishers[topic] = (rospy.Publisher(topic, message_class, queue_size=10), message_class)
                elif op == "publish" and topic in publishers:
                    publisher, message_class = publishers[topic]
                    publisher.publish(dict_to_rospy(message_class, request["msg"]))
                elif op == "subscribe":
                    subscribers[request.get("id", topic)] = rospy.Subscriber(
                        topic, _message_class(request["type"]), forward(topic, request["type"]), queue_size=10,
                        tcp_nodelay=True)
                elif op == "unsubscribe":
                    subscriber = subscribers.pop(request.get("id", topic), None)
                    if subscriber is not None:
                        subscriber.unregister()
                elif op == "unadvertise" and topic in publishers:
                    publishers.pop(topic)[0].unregister()
        except websockets.exceptions.ConnectionClosed:
            pass
        finally:
            for subscriber in subscribers.values():
                subscriber.unregister()
            for publisher, _ in publishers.values():
                publisher.unregister()


def test_robot_env_over_rosbridge_drives_the_twin(tmp_path):
    from test_robot_ros import LOCKSTEP, ExpertPolicy, Twin

    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.roscore import session_master
    from robofinetune.robot.runner import run_policy

    session_master()
    relay = RosbridgeRelay().start()
    try:
        with Twin(LOCKSTEP):
            env = RobotEnv(LOCKSTEP, overrides={"transport": "rosbridge",
                                                "rosbridge": {"host": "127.0.0.1", "port": relay.port}})
            assert env.transport.name == "rosbridge"
            try:
                result = run_policy(env, ExpertPolicy(env), 2, seed=11, warmup=False)
            finally:
                env.close()
    finally:
        relay.stop()
    assert {"advertise", "subscribe", "publish"} <= set(relay.operations)
    assert result.successes == 2, result.to_dict()
    assert all(outcome.length > 5 for outcome in result.episodes)
    assert np.isfinite(result.latency_ms).all()

"""``robofinetune robot-actor status|stop --name=NAME``: look at or end a robot actor from a shell.

A robot actor (:mod:`robofinetune.distributed.robot_actor`) is a detached Ray actor: it outlives the learner that
started it, which is what ``train residual --robot_actor_keep_running`` and a learner that crashed rely on. These
verbs reach it by name without attaching a learner (no weights taken over, no rows drained):

    robofinetune robot-actor status --name=residual-<robot> [--json] [--ray-address=auto]
    robofinetune robot-actor stop --name=residual-<robot> [--ray-address=auto]

``stop`` ends the actor's loop after its current step (the robot holds) and then the actor; a learner still
attached to it fails on its next drain, saying the actor is gone.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from robofinetune.distributed.robot_actor import DEFAULT_NAMESPACE, RobotActorHandle, RobotActorStats


def add_robot_actor_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "robot-actor", help="status / stop a robot actor (train residual --robot-actor)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="robot_actor_command", required=True)
    status = verbs.add_parser("status", help="its loop's rate, steps, weights version, rows, attached learner")
    status.add_argument("--json", action="store_true", help="every stats field as one JSON object")
    stop = verbs.add_parser("stop", help="stop its loop (the robot holds) and end the actor")
    for verb in (status, stop):
        verb.add_argument("--name", required=True,
                          help="the actor's Ray name (train residual's robot_actor_name; default residual-<robot>)")
        verb.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="its Ray namespace")
        verb.add_argument("--ray-address", default="auto",
                          help="the Ray cluster it runs in (default auto: the cluster `ray start` runs on this "
                               "machine; ray://<head-ip>:10001 from outside it)")
    status.set_defaults(handler=command_status)
    stop.set_defaults(handler=command_stop)
    return parser


def command_status(args: argparse.Namespace) -> int:
    handle = RobotActorHandle.find(args.name, args.namespace, args.ray_address)
    stats = handle.stats()
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
    else:
        print(describe(args.name, stats))
    return 0


def command_stop(args: argparse.Namespace) -> int:
    handle = RobotActorHandle.find(args.name, args.namespace, args.ray_address)
    stats = handle.stats()
    handle.stop()
    attached = f"; the attached learner ({stats.learner}) fails on its next drain" if stats.learner else ""
    print(f"stopped the robot actor {args.name!r} after {stats.steps} steps (the robot holds){attached}")
    return 0


def describe(name: str, stats: RobotActorStats) -> str:
    """The stats as a few lines for a person."""
    if stats.running:
        state = "running"
    elif stats.stop_requested:
        state = "stopped by its operator at the robot (the loop does not restart: stop the actor)"
    else:
        state = f"loop stopped: {stats.error}"
    learner = (f"{stats.learner}, heard from {stats.learner_heard_s:.1f} s ago" if stats.learner is not None
               else "none attached")
    period = ("-" if stats.period_ms_p50 is None
              else f"p50 {stats.period_ms_p50:.1f} ms, p99 {stats.period_ms_p99:.1f} ms")
    weights = ("none yet (warm-up)" if stats.weights_version < 0
               else f"version {stats.weights_version}, {stats.seconds_since_weights:.1f} s old")
    lines = [f"robot actor {name!r}: {state}",
             f"  learner:  {learner}",
             f"  loop:     {stats.steps} steps, {stats.episodes} episodes, {stats.achieved_rate_hz:.1f} of "
             f"{stats.target_rate_hz:g} Hz over the last {stats.window} steps ({period})",
             f"  weights:  {weights}" + (f"; fetching failed: {stats.weights_error}" if stats.weights_error else ""),
             f"  rows:     {stats.rows_waiting} waiting, {stats.rows_delivered} delivered, "
             f"{stats.rows_dropped} dropped",
             f"  robot:    {stats.safety_interventions} safety interventions this episode, {stats.aborted_steps} "
             f"aborted steps" + (f"; recovering from: {stats.robot_error}" if stats.robot_error else "")]
    return "\n".join(lines)

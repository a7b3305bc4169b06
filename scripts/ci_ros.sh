#!/usr/bin/env bash
# ROS 1 for the real-robot tests and dry runs: Debian's ros-core, and a roscore on loopback.
#
#   scripts/ci_ros.sh install           apt-get install the ROS 1 packages (root, Debian/Ubuntu; ~25 s)
#   eval "$(scripts/ci_ros.sh start)"   start roscore on 127.0.0.1:${ROS_PORT:-11311}, export ROS_MASTER_URI/ROS_IP
#   scripts/ci_ros.sh stop              stop the roscore this script started
#   scripts/ci_ros.sh status
#
# Tests that need a master use ROS_MASTER_URI when it answers, else start their own on a free loopback port
# (robofinetune.robot.roscore.session_master), so `make test` also works without `start`.
set -euo pipefail

PACKAGES="ros-core python3-rospy python3-sensor-msgs python3-geometry-msgs python3-std-msgs"
PORT="${ROS_PORT:-11311}"
STATE_DIR="${TMPDIR:-/tmp}/robofinetune-roscore-${PORT}"
PID_FILE="${STATE_DIR}/roscore.pid"
URI="http://127.0.0.1:${PORT}"

master_up() {
    # the system python3 (not a virtualenv's) has Debian's rosgraph
    ROS_MASTER_URI="$URI" /usr/bin/python3 -c 'import rosgraph, sys; sys.exit(0 if rosgraph.is_master_online() else 1)' \
        2>/dev/null
}

case "${1:-}" in
install)
    if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
        echo "ci_ros.sh install: needs root on Debian/Ubuntu; install $PACKAGES yourself" >&2
        exit 1
    fi
    if ! command -v roscore >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PACKAGES >/dev/null
    fi
    echo "ROS 1 installed: $(command -v roscore)" >&2
    ;;
start)
    mkdir -p "$STATE_DIR"
    if master_up; then
        echo "ci_ros.sh: a master already answers on $URI" >&2
    else
        ROS_MASTER_URI="$URI" ROS_IP=127.0.0.1 ROS_HOME="$STATE_DIR" ROS_LOG_DIR="$STATE_DIR/log" \
            setsid roscore -p "$PORT" >"$STATE_DIR/roscore.log" 2>&1 < /dev/null &
        echo $! >"$PID_FILE"
        for _ in $(seq 1 150); do
            master_up && break
            sleep 0.2
        done
        if ! master_up; then
            echo "ci_ros.sh: roscore did not come up on $URI; see $STATE_DIR/roscore.log" >&2
            exit 1
        fi
        echo "ci_ros.sh: roscore up on $URI (pid $(cat "$PID_FILE"))" >&2
    fi
    echo "export ROS_MASTER_URI=$URI ROS_IP=127.0.0.1"
    ;;
stop)
    if [ -f "$PID_FILE" ]; then
        pid="$(cat "$PID_FILE")"
        # roscore runs in its own session (setsid): its process group id is its pid
        kill -INT -- "-$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        rm -f "$PID_FILE"
        echo "ci_ros.sh: roscore stopped" >&2
    fi
    ;;
status)
    if master_up; then echo "master up on $URI"; else echo "no master on $URI"; exit 1; fi
    ;;
*)
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
    ;;
esac

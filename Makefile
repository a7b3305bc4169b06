# One command sets up and runs each job; every target creates the environment it needs.
#   make train      the flagship: residual RL on the shipped weak can base (collects demos if absent)
#   make test       the fast test suite (~10 min on 2 CPU cores)
#   make test-slow  the slow tests (robosuite training, long rollouts)
VENV ?= .venv
PYTHON ?= python3
# A CPU machine must install this torch first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: setup system-deps train train-bc test test-slow check-readers bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,ray]"
	touch $@

setup: $(BIN)/.installed

# Debian packages: offscreen MuJoCo rendering through EGL on the CPU (videos), ffmpeg, and ROS 1 for the
# real-robot stack (roscore, rospy and the message packages).
SYSTEM_PACKAGES = libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 ffmpeg \
	ros-core python3-rospy python3-sensor-msgs python3-geometry-msgs python3-std-msgs
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "system-deps: run as root on Debian/Ubuntu, or install: $(SYSTEM_PACKAGES)"; fi

train: setup
	$(BIN)/robofinetune train residual --task=can

train-bc: setup
	$(BIN)/robofinetune train bc --task=can

test: setup
	$(BIN)/python -m pytest -q --durations=25    # the slowest tests, to keep the default run ~15 min

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# robomimic's and LeRobot's own readers open what robofinetune writes (builds the side venv .venv-readers once)
check-readers: setup
	$(BIN)/python scripts/check_external_readers.py

bench: setup
	$(BIN)/python benchmarks/bc_can.py

clean:
	rm -rf $(VENV) .venv-readers runs .pytest_cache

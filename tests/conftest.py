import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
torch.set_num_threads(1)

# .ci/run sets this: there, ROS 1 is installed and a roscore runs, so a `ros`-marked test that skips (rospy not
# importable, no roscore on the PATH) means the end-to-end robot tests silently did not run: fail it instead.
REQUIRE_ROS = os.environ.get("ROBOFINETUNE_REQUIRE_ROS", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ROS and report.skipped and item.get_closest_marker("ros") is not None:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"ROBOFINETUNE_REQUIRE_ROS is set but this ROS test was skipped: {reason}")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)

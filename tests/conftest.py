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


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray (2 CPUs, no dashboard) for every Ray test of the session: starting Ray takes seconds."""
    ray = pytest.importorskip("ray", reason="Ray env workers need `pip install 'robofinetune[ray]'`")
    try:
        for attempt in range(3):
            try:
                ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 * 1024 * 1024,
                         log_to_driver=False)
                break
            except Exception:
                # Ray gives its raylet a fixed 30 s to register; on a loaded machine that can pass: try again,
                # with no raylet of the failed start left behind
                ray.shutdown()
                if attempt == 2:
                    raise
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)

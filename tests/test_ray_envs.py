"""Env workers as Ray actors (robofinetune.distributed): the subprocess vector env's episodes, a killed worker
restarted without losing or repeating delivered transitions, and ``train residual --num-env-workers``.

One local Ray (2 CPUs, no dashboard, tests/conftest.py) serves the whole session: starting Ray takes seconds."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray env workers need `pip install 'robofinetune[ray]'`")

from robofinetune.distributed.ray_envs import RayVectorEnv  # noqa: E402
from robofinetune.envs import make_vector_env  # noqa: E402
from robofinetune.rl import VectorRollout  # noqa: E402


# the session's local Ray (tests/conftest.py), shared with the other Ray test modules
pytestmark = pytest.mark.usefixtures("local_ray")


def run_steps(envs, actions, reset_seed):
    """Every output of ``reset(seed)`` then one step per row of ``actions``, as plain arrays."""
    obs, _ = envs.reset(seed=reset_seed)
    steps = [{"obs": obs}]
    for action in actions:
        if hasattr(envs, "step_async"):   # as VectorRollout drives them (a SyncVectorEnv has only step)
            envs.step_async(action)
            obs, reward, terminated, truncated, info = envs.step_wait()
        else:
            obs, reward, terminated, truncated, info = envs.step(action)
        finished = np.flatnonzero(terminated | truncated)
        steps.append({"obs": obs, "reward": reward, "terminated": terminated, "truncated": truncated,
                      "final_obs": {int(i): info["final_obs"][i] for i in finished},
                      "final_success": {int(i): bool(info["final_info"]["is_success"][i]) for i in finished},
                      "is_success": info["is_success"]})
    return steps


def assert_same_steps(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a.keys() == b.keys()
        for key in a:
            if key == "obs":
                for name in b["obs"]:
                    np.testing.assert_array_equal(a["obs"][name], b["obs"][name], err_msg=f"step {step} obs {name}")
            elif key == "final_obs":
                assert a[key].keys() == b[key].keys(), f"step {step}: different envs finished"
                for index in b[key]:
                    for name in b[key][index]:
                        np.testing.assert_array_equal(a[key][index][name], b[key][index][name])
            elif key == "final_success":
                assert a[key] == b[key], f"step {step}"
            else:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step} {key}")


def test_ray_workers_give_the_subprocess_vector_envs_episodes():
    actions = np.random.default_rng(0).uniform(-1, 1, (14, 3, 2)).astype(np.float32)
    subprocess_envs = make_vector_env("pointmass", num_envs=3, seed=7, horizon=5)
    ray_envs = make_vector_env("pointmass", num_envs=3, seed=7, horizon=5, backend="ray", num_workers=2)
    try:
        assert isinstance(ray_envs, RayVectorEnv) and ray_envs.shares == [[0, 1], [2]]
        assert ray_envs.single_observation_space == subprocess_envs.single_observation_space
        assert ray_envs.metadata["autoreset_mode"] == subprocess_envs.metadata["autoreset_mode"]
        # construction seeds (reset(None)), then an explicit reseed; horizon 5 puts autoresets at steps 5 and 10
        theirs = run_steps(subprocess_envs, actions, None) + run_steps(subprocess_envs, actions[:6], 123)
        ours = run_steps(ray_envs, actions, None) + run_steps(ray_envs, actions[:6], 123)
    finally:
        subprocess_envs.close()
        ray_envs.close()
    assert_same_steps(ours, theirs)
    assert sum(len(step.get("final_obs", {})) for step in ours) >= 6   # the autoresets were exercised
    assert ray.is_initialized()                                       # a Ray it did not start stays up


def wait_until_gone(envs, worker):
    """Return once the worker's old incarnation no longer answers (ray.kill is asynchronous): the next step
    must then find it dead or restarted."""
    while True:
        try:
            token, _ = ray.get(envs.workers[worker].identity.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            return
        if token != envs.incarnations[worker]:
            return


def kill_worker_process(envs, worker):
    os.kill(envs.pids[worker], signal.SIGKILL)
    wait_until_gone(envs, worker)


def kill_worker_actor(envs, worker):
    ray.kill(envs.workers[worker], no_restart=False)
    wait_until_gone(envs, worker)


@pytest.mark.parametrize("kill", [kill_worker_process, kill_worker_actor], ids=["kill-9", "ray.kill"])
def test_a_killed_worker_is_restarted_and_only_its_unfinished_episode_is_aborted(kill):
    actions = np.random.default_rng(1).uniform(-1, 1, (12, 2, 2)).astype(np.float32)
    reference = make_vector_env("pointmass", num_envs=2, seed=3, horizon=50, asynchronous=False)
    envs = make_vector_env("pointmass", num_envs=2, seed=3, horizon=50, backend="ray", num_workers=2)
    try:
        expected = run_steps(reference, actions, 3)
        infos = []   # the vector env's step infos, which VectorRollout does not pass on
        step_wait = envs.step_wait
        envs.step_wait = lambda: (lambda result: (infos.append(result[4]), result)[1])(step_wait())
        rollout = VectorRollout(envs)
        rollout.reset(seed=3)
        delivered = [rollout.step(action) for action in actions[:4]]
        old_pid = envs.pids[1]
        kill(envs, 1)
        after = [rollout.step(action) for action in actions[4:]]
    finally:
        reference.close()
        envs.close()
    # every transition delivered before the kill is the undisturbed one, for both envs
    for step, transitions in enumerate(delivered, start=1):
        for name in transitions.next_obs:
            np.testing.assert_array_equal(transitions.next_obs[name], expected[step]["obs"][name])
    # exactly one abort: env 1's episode, at the first step after the kill, reported as truncated with no reward
    aborted_at = [step for step, transitions in enumerate(after) if transitions.truncated[1]]
    assert aborted_at == [0]
    aborted = after[0]
    assert aborted.reward[1] == 0.0 and not aborted.terminated[1]
    assert infos[4]["final_info"]["aborted"].tolist() == [False, True]
    assert not any("aborted" in info.get("final_info", {}) for index, info in enumerate(infos) if index != 4)
    assert [(outcome.env_index, outcome.success, outcome.aborted) for outcome in aborted.finished] == [(1, False, True)]
    assert aborted.aborted.tolist() == [False, True]   # the learner drops this row (train residual's store)
    assert not any(transitions.aborted.any() for transitions in after[1:])
    for name in aborted.next_obs:   # no made-up next state: the aborted row ends where env 1 was
        np.testing.assert_array_equal(aborted.next_obs[name][1], delivered[-1].next_obs[name][1])
    # the restarted worker starts a new episode from a fresh seed, not a replay of the one it lost
    new_start = after[1].obs
    assert not np.array_equal(new_start["goal_pos"][1], expected[0]["obs"]["goal_pos"][1])
    assert not np.array_equal(new_start["agent_pos"][1], expected[0]["obs"]["agent_pos"][1])
    # env 0's worker was never touched: its whole rollout is the undisturbed one
    for offset, transitions in enumerate(after, start=5):
        for name in transitions.next_obs:
            np.testing.assert_array_equal(transitions.next_obs[name][0], expected[offset]["obs"][name][0])
    assert envs.restarts == 1 and envs.aborted_episodes == 1 and envs.pids[1] != old_pid
    assert len(envs.recovery_seconds) == 1 and envs.recovery_seconds[0] > 0


def test_a_worker_killed_for_good_is_a_clear_error():
    from robofinetune.distributed.ray_envs import EnvWorkerError
    from robofinetune.envs import load_task_spec

    envs = RayVectorEnv(load_task_spec("pointmass"), num_envs=1, seed=0, max_restarts=0)
    try:
        envs.reset(seed=0)
        ray.kill(envs.workers[0])
        with pytest.raises(EnvWorkerError, match="env worker 0 .*0 restarts"):
            envs.step(np.zeros((1, 2), np.float32))
    finally:
        envs.close()


def test_an_env_that_fails_to_build_in_a_worker_is_a_clear_error():
    from robofinetune.distributed.ray_envs import EnvWorkerError

    with pytest.raises(EnvWorkerError, match="env workers for task 'pointmass' failed to start: .*TaskError.*no_such_kwarg"):
        make_vector_env("pointmass", num_envs=2, backend="ray", num_workers=1, no_such_kwarg=3)


def test_more_workers_than_the_cluster_has_cpus_is_refused_at_once():
    from robofinetune.errors import ConfigError

    with pytest.raises(ConfigError, match="3 env workers reserve 3 CPUs but the Ray cluster has 2"):
        make_vector_env("pointmass", num_envs=3, backend="ray", num_workers=3)


def test_train_residual_with_ray_env_workers_writes_its_run(tmp_path):
    from bc_common import train_pointmass_base

    from robofinetune.cli import main

    (tmp_path / "bc").mkdir()
    base, demos = train_pointmass_base(tmp_path / "bc", demos=6, max_steps=10, hidden_dim=16, depth=1, batch_size=32,
                                       warmup_steps=2)
    runs = tmp_path / "runs"
    assert main(["train", "residual", "--task=pointmass", f"--base={base}", f"--dataset={demos}",
                 f"--runs-dir={runs}", "--num-env-workers=2", "--num_envs=2", "--total_env_steps=300",
                 "--critic_hidden_dim=16", "--num_critics=2", "--actor_hidden_dim=16", "--batch_size=16",
                 "--updates_per_step=0.1", "--warmup_steps=100", "--eval_every=150", "--eval_episodes=1",
                 "--final_eval_episodes=2", "--eval_envs=2", "--checkpoint_every=150", "--log_every=100", "--progress=false"]) == 0
    run = next(runs.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == 300 and summary["episodes"] >= 2 and summary["actor_updates"] > 0
    assert (run / "policy").is_dir() and (run / "checkpoints" / "latest" / "online.npz").exists()
    assert "num_env_workers: 2" in (run / "config.yaml").read_text()
    # the evaluation mid-run forked its local env processes while Ray was up, and finished
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/success" in line for line in metrics) and summary["final_success"] is not None
    # eval through Ray workers runs, and agrees with local env processes (same seeds, same episodes)
    reports = {}
    for name, extra in (("local", []), ("ray", ["--num-env-workers=2"])):
        output = tmp_path / f"eval_{name}.json"
        assert main(["eval", "--task=pointmass", f"--policy={run / 'policy'}", "--episodes=3", "--num-envs=2",
                     f"--output={output}", *extra]) == 0
        reports[name] = json.loads(output.read_text())
    assert reports["ray"]["episode_length"] == reports["local"]["episode_length"]
    assert reports["ray"]["episode_success"] == reports["local"]["episode_success"]
    assert ray.is_initialized()   # the module's Ray: the run used it and left it up


def test_weights_reach_a_worker_every_k_updates_and_staleness_is_counted():
    import torch

    from robofinetune.distributed.weights import (StalenessLog, WeightBroadcaster, WeightSubscriber,
                                                  load_numpy_state)

    @ray.remote(num_cpus=0)
    class PolicyWorker:
        def __init__(self, store):
            self.subscriber = WeightSubscriber(store)
            self.net = torch.nn.Linear(2, 1)

        def sync(self):
            state = self.subscriber.poll()
            if state is not None:
                load_numpy_state(self.net, state)
            return self.subscriber.version, float(self.net.bias.item()), state is not None

    learner_net = torch.nn.Linear(2, 1)
    broadcaster = WeightBroadcaster(every=3)
    worker = PolicyWorker.remote(broadcaster.store)
    published = []
    for updates in range(1, 8):
        with torch.no_grad():
            learner_net.bias.fill_(float(updates))
        published.append(broadcaster.maybe_publish(updates, learner_net))
    assert published == [True, False, False, True, False, False, True]   # at updates 1, 4, 7
    assert ray.get(worker.sync.remote()) == (7, 7.0, True)                 # the newest weights, as they were at 7
    assert ray.get(worker.sync.remote()) == (7, 7.0, False)                # no new version: nothing fetched
    ray.kill(worker)

    log = StalenessLog()
    assert log.record(np.array([7, 7, 4]), learner_updates=9).tolist() == [2, 2, 5]
    assert log.summary() == {"staleness_mean": 3.0, "staleness_max": 5.0, "staleness_transitions": 3.0}
    with pytest.raises(ValueError, match="version 10"):
        log.record(np.array([10]), learner_updates=9)

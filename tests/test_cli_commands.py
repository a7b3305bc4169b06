"""The commands as a user runs them, through ``robofinetune.cli.main``: ``data info|convert``, ``gate`` (exit codes
0/1/2 and its history), ``train residual``, the BC final evaluation, the shipped checkpoints; and the bad inputs
each training command must refuse with an error naming the file and the field (exit status 2), never a
traceback or a silently wrong run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from robofinetune.cli import main
from robofinetune.data.collect import collect_episodes
from robofinetune.data.episode import Episode
from robofinetune.data.io import load_dataset, save_dataset
from robofinetune.data.synthetic import synthetic_episodes
from robofinetune.errors import DatasetError
from robofinetune.policies import load_policy, save_policy

REPO = Path(__file__).resolve().parents[1]
CAN_BASE = REPO / "policies" / "can" / "weak_diffusion"
POINTMASS_META = {"env_name": "pointmass", "task": "pointmass"}
LIFT_SHAPES = {"robot0_eef_pos": (3,), "robot0_eef_quat": (4,), "robot0_gripper_qpos": (2,), "object": (10,)}
# tiny settings: each command below runs in seconds
TINY_BC = ["--max-steps=20", "--batch-size=32", "--hidden-dim=16", "--depth=1", "--n-obs-steps=1", "--horizon=4",
           "--n-action-steps=2", "--warmup-steps=5", "--eval-episodes=0", "--checkpoint-every=1000"]
TINY_RESIDUAL = ["--total_env_steps=120", "--num_envs=1", "--critic_hidden_dim=16", "--num_critics=2",
                 "--actor_hidden_dim=16", "--batch_size=16", "--updates_per_step=0.25", "--warmup_steps=40",
                 "--eval_every=0", "--eval_episodes=1", "--final_eval_episodes=2", "--eval_envs=1",
                 "--checkpoint_every=60", "--log_every=40", "--progress=false"]
TINY_OGPO = ["--total_env_steps=40", "--progress=false", "--eval_base=false", "--final_eval_episodes=1",
             "--critic_hidden_dim=16", "--critic_batch_size=16", "--group_size=2", "--actor_states=2"]
TINY_DISTILL = ["--rollout-episodes=0", "--max-steps=4", "--batch-size=16", "--eval-episodes=0", "--warmup-steps=1",
                "--checkpoint-every=2"]
TINY_GATE = ["--heads=3", "--hidden-dim=16", "--depth=1", "--iterations=2", "--steps-per-iteration=3",
             "--batch-size=16", "--action-samples=1", "--no-plot"]


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demos")
    return save_dataset(collect_episodes("pointmass", 8, seed=1, progress=False), folder / "pointmass.hdf5",
                        env_meta=POINTMASS_META)


@pytest.fixture(scope="module")
def tiny_policy(demos, tmp_path_factory) -> Path:
    """A (poor) pointmass diffusion policy from 20 BC steps."""
    runs = tmp_path_factory.mktemp("bc_runs")
    assert main(["train", "bc", "--task=pointmass", f"--dataset={demos}", f"--runs-dir={runs}", *TINY_BC]) == 0
    return next(runs.iterdir()) / "policy"


def write_episodes(path: Path, episodes: list[Episode], env_meta: dict | None = None) -> Path:
    return save_dataset(episodes, path, env_meta=env_meta)


def scaled_actions(episodes: list[Episode], factor: float) -> list[Episode]:
    return [Episode({key: value.copy() for key, value in e.observations.items()}, e.actions * factor,
                    success=e.success, final_observation=e.final_observation) for e in episodes]


def error_of(capsys) -> str:
    return capsys.readouterr().err


# --- data info / data convert ----------------------------------------------------------------------------------------

def test_data_info_and_convert_round_trip_through_the_cli(demos, tmp_path, capsys):
    episodes, _ = load_dataset(demos)
    successes, steps = sum(e.success for e in episodes), sum(len(e) for e in episodes)
    assert main(["data", "info", str(demos)]) == 0
    text = capsys.readouterr().out
    assert f"episodes: 8   successes: {successes}/8   steps: {steps}" in text and "agent_pos" in text
    assert main(["data", "info", str(demos), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["episodes"] == 8 and info["total_steps"] == steps and info["obs"]["goal_pos"]["shape"] == [2]

    # hdf5 -> zarr -> LeRobot -> hdf5: every array and flag comes back
    zarr_path, lerobot_path, back = tmp_path / "d.zarr", tmp_path / "d_lerobot", tmp_path / "back.hdf5"
    for source, destination in ((demos, zarr_path), (zarr_path, lerobot_path), (lerobot_path, back)):
        assert main(["data", "convert", str(source), str(destination)]) == 0
        assert f"wrote {destination}" in capsys.readouterr().out
    for path in (zarr_path, lerobot_path, back):
        converted, env_meta = load_dataset(path)
        assert env_meta["task"] == "pointmass", path
        assert [e.success for e in converted] == [e.success for e in episodes], path
        for original, copy in zip(episodes, converted):
            assert np.array_equal(original.actions, copy.actions), path
            for key in original.observations:
                assert np.array_equal(original.observations[key], copy.observations[key]), (path, key)

    assert main(["data", "convert", str(demos), str(tmp_path / "d.txt")]) == 2
    assert "d.txt: cannot tell the format" in error_of(capsys)
    assert main(["data", "info", str(tmp_path / "missing.hdf5")]) == 2
    assert "missing.hdf5: not found" in error_of(capsys)


# --- gate ------------------------------------------------------------------------------------------------------------

def test_gate_exits_1_on_reject_0_on_promote_2_on_bad_input_and_keeps_its_history(tiny_policy, demos, tmp_path,
                                                                                   capsys):
    from robofinetune.robot.cli import deploy_permission

    candidate, incumbent = tmp_path / "candidate", tmp_path / "incumbent"
    shutil.copytree(tiny_policy, candidate)
    policy = load_policy(tiny_policy, device="cpu")
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_policy(policy, incumbent)
    gate = ["gate", f"--candidate={candidate}", f"--incumbent={incumbent}", f"--data={demos}", *TINY_GATE]

    def history() -> list[str]:
        lines = (candidate / "gate_history.jsonl").read_text().splitlines()
        return [json.loads(line)["decision"] for line in lines]

    assert main([*gate, "--margin=10"]) == 1             # no gain can clear a margin of 10 (values are <= 1)
    assert "REJECT" in capsys.readouterr().out
    assert json.loads((candidate / "gate.json").read_text())["decision"] == "REJECT" and history() == ["REJECT"]
    assert not deploy_permission(candidate, incumbent, force=False).allowed

    assert main([*gate, "--margin=-10"]) == 0            # any estimate clears a margin of -10
    assert "PROMOTE" in capsys.readouterr().out
    assert json.loads((candidate / "gate.json").read_text())["decision"] == "PROMOTE"
    assert history() == ["REJECT", "PROMOTE"]
    assert deploy_permission(candidate, incumbent, force=False).allowed

    can_data = write_episodes(tmp_path / "can.hdf5", synthetic_episodes(3), {"env_name": "PickPlaceCan", "task": "can"})
    assert main([*gate[:3], f"--data={can_data}", *TINY_GATE]) == 2
    assert "can.hdf5" in error_of(capsys)
    assert main([*gate, "--confidence=1.5"]) == 2
    assert "confidence" in error_of(capsys)
    assert main(["gate", f"--candidate={tmp_path / 'nothing'}", f"--incumbent={incumbent}", f"--data={demos}",
                 *TINY_GATE]) == 2
    assert "nothing" in error_of(capsys)
    assert history() == ["REJECT", "PROMOTE"]          # refused runs record nothing


# --- train residual, its checkpoints and --resume ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def residual_run(tiny_policy, demos, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("residual_runs")
    assert main(["train", "residual", "--task=pointmass", f"--base={tiny_policy}", f"--dataset={demos}",
                 f"--runs-dir={runs}", *TINY_RESIDUAL]) == 0
    return next(runs.iterdir())


def test_train_residual_through_the_cli_writes_a_loadable_composite_policy(residual_run, tiny_policy):
    summary = json.loads((residual_run / "summary.json").read_text())
    assert summary["env_steps"] == 120 and summary["critic_updates"] > 0 and summary["actor_updates"] > 0
    report = json.loads((residual_run / "eval.json").read_text())
    assert report["episodes"] == 2 and 0.0 <= report["success_rate"] <= 1.0
    policy = load_policy(residual_run / "policy", device="cpu", task="pointmass")
    assert policy.kind == "residual"
    # the stored base is the given one, weight for weight
    base = load_policy(tiny_policy, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(policy.base.state_dict().values(), base.state_dict().values()))
    obs = {key: np.zeros((2, 2), np.float32) for key in ("agent_pos", "agent_vel", "goal_pos")}
    action = policy.select_action(obs)
    assert action.shape == (2, 2) and np.all(np.abs(action) <= 1.0)
    assert (residual_run / "checkpoints" / "latest" / "online.npz").exists()


@pytest.mark.parametrize("damaged", ["online.npz", "offline.npz", "state.pt"])
def test_resume_of_a_truncated_checkpoint_names_the_file(residual_run, tmp_path, capsys, damaged):
    run = tmp_path / residual_run.name
    shutil.copytree(residual_run, run)
    target = run / "checkpoints" / "latest" / damaged
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    assert main(["train", "residual", f"--resume={run}", "--total_env_steps=160"]) == 2
    err = error_of(capsys)
    assert f"{target}: unreadable" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["train", "bc"], ["train", "residual"], ["train", "ogpo"], ["distill"]])
def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys, command):
    folder = tmp_path / "some_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run")
    assert main([*command, f"--resume={folder}"]) == 2
    assert f"{folder}: not a run folder" in error_of(capsys)


def test_distill_resume_refuses_changed_learning_settings_like_train(tiny_policy, demos, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["distill", f"--teacher={tiny_policy}", f"--dataset={demos}", f"--runs-dir={runs}", *TINY_DISTILL]) == 0
    run = next(runs.iterdir())
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["distill", f"--resume={run}", "--learning-rate=0.5", "--target=bootstrap"]) == 2
    err = error_of(capsys)
    assert "not ['learning_rate', 'target']" in err and str(run) in err
    assert (run / "config.yaml").read_text() == saved
    # what may change (how the run is watched) is applied and saved
    assert main(["distill", f"--resume={run}", "--log-every=1"]) == 0
    assert "log_every: 1" in (run / "config.yaml").read_text()


# --- the BC final evaluation ---------------------------------------------------------------------------------------------

def test_bc_final_evaluation_reports_success_with_its_interval(demos, tmp_path, capsys):
    runs = tmp_path / "runs"
    flags = [flag for flag in TINY_BC if not flag.startswith("--eval-episodes")]
    assert main(["train", "bc", "--task=pointmass", f"--dataset={demos}", f"--runs-dir={runs}", *flags,
                 "--eval-episodes=4", "--eval-envs=1"]) == 0
    out = capsys.readouterr().out
    run = next(runs.iterdir())
    report = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert report["episodes"] == 4 and summary["eval_episodes"] == 4
    assert summary["success"] == report["success_rate"] and summary["success_ci"] == report["success_ci"]
    low, high = summary["success_ci"]
    assert 0.0 <= low <= summary["success"] <= high <= 1.0 and high - low > 0.3   # 4 episodes: a wide interval
    assert f"  success: {summary['success']}" in out
    assert "  eval_summary: " in out and "95% CI" in out


# --- shipped checkpoints ------------------------------------------------------------------------------------------------

SHIPPED = sorted(path.parent for path in (REPO / "policies").glob("**/policy.json"))


def shipped_task(folder: Path) -> str:
    from robofinetune.policies.checkpoint import read_policy_document

    return read_policy_document(folder)["config"]["task"]


def test_every_shipped_policy_is_found():
    assert len(SHIPPED) >= 6 and {"can", "lift"} <= {shipped_task(path) for path in SHIPPED}


@pytest.mark.parametrize("task", sorted({shipped_task(path) for path in SHIPPED}))
def test_shipped_policies_load_and_drive_their_env(task):
    """A config or network change that breaks a shipped checkpoint fails here, not in a user's hands."""
    from robofinetune.envs import make_env
    from robofinetune.policies import check_policy_matches_env

    env = make_env(task, seed=0)
    try:
        for folder in (path for path in SHIPPED if shipped_task(path) == task):
            policy = load_policy(folder, device="cpu", task=task)
            check_policy_matches_env(policy, env, str(folder))
            assert (folder / "CARD.md").exists(), folder
            obs, _ = env.reset(seed=0)
            policy.reset()
            actions = []
            for _ in range(4):
                action = policy.select_action({key: value[None] for key, value in obs.items()})
                assert action.shape == (1, env.action_space.shape[0]), folder
                assert np.all(np.isfinite(action)) and np.all(np.abs(action) <= 1.0), (folder, action)
                actions.append(action[0])
                obs, *_ = env.step(action[0])
            assert np.ptp(np.asarray(actions), axis=0).max() > 0, folder   # it reacts to the state: not constant
    finally:
        env.close()


# --- bad inputs: data, bases and teachers of another task --------------------------------------------------------------

def train_command(method: str, dataset: Path, runs: Path, task: str = "can", base: Path = CAN_BASE) -> list[str]:
    common = [f"--dataset={dataset}", f"--runs-dir={runs}"]
    if method == "bc":
        return ["train", "bc", f"--task={task}", *common, *TINY_BC]
    if method == "residual":
        return ["train", "residual", f"--task={task}", f"--base={base}", *common, *TINY_RESIDUAL]
    if method == "ogpo":
        return ["train", "ogpo", f"--task={task}", f"--base={base}", *common, *TINY_OGPO]
    return ["distill", f"--teacher={base}", f"--task={task}", *common, *TINY_DISTILL]


METHODS = ["bc", "residual", "ogpo", "distill"]


@pytest.mark.parametrize("method", METHODS)
def test_a_dataset_of_another_task_is_refused(method, tmp_path, capsys):
    lift = synthetic_episodes(4, obs_shapes=LIFT_SHAPES)
    labelled = write_episodes(tmp_path / "lift.hdf5", lift, {"env_name": "Lift", "task": "lift"})
    assert main(train_command(method, labelled, tmp_path / "runs")) == 2
    err = error_of(capsys)
    assert f"{labelled}: env_meta says the episodes were recorded for task 'lift', not 'can'" in err, err
    # without a task in its metadata the layout still gives it away: can's 'object' is 14 numbers, lift's 10
    unlabelled = write_episodes(tmp_path / "unlabelled.hdf5", lift)
    assert main(train_command(method, unlabelled, tmp_path / "runs")) == 2
    err = error_of(capsys)
    assert f"{unlabelled}: episode 0: observation 'object' has shape (10,) per step, task 'can' expects (14,)" in err, err


def test_the_task_check_tells_another_scene_from_another_view_of_the_same_scene():
    from robofinetune.data.task_check import check_training_demos
    from robofinetune.envs import load_task_spec

    can, square, can_image = (load_task_spec(name) for name in ("can", "square", "can_image"))
    episodes = synthetic_episodes(2)                       # can's layout
    check_training_demos(episodes, {"env_name": "PickPlaceCan"}, can, "d.hdf5")             # robomimic's can
    check_training_demos(episodes, {"task": "can"}, can_image, "d.hdf5", obs_shapes={})    # same scene, cameras
    with pytest.raises(DatasetError, match="d.hdf5: env_meta says .* task 'square', not 'can'"):
        check_training_demos(episodes, {"task": "square"}, can, "d.hdf5")                   # same layout, other scene
    with pytest.raises(DatasetError, match="task 'aloha_insertion', not 'can'"):
        check_training_demos(episodes, {"task": "aloha_insertion"}, can, "d.hdf5")
    nudged = scaled_actions(episodes, 1.0)
    nudged[1].actions[3, 6] = 1.0 + 1e-7                   # float round-off at the boundary is not an error
    check_training_demos(nudged, None, can, "d.hdf5")
    nudged[1].actions[3, 6] = -1.2
    with pytest.raises(DatasetError, match="d.hdf5: episode 1: field 'actions' holds -1.2 at step 3, dim 6"):
        check_training_demos(nudged, None, can, "d.hdf5")


@pytest.mark.parametrize("method", ["residual", "ogpo", "distill"])
def test_a_base_or_teacher_of_another_task_is_refused(method, demos, tmp_path, capsys):
    assert main(train_command(method, demos, tmp_path / "runs", task="pointmass", base=CAN_BASE)) == 2
    assert f"{CAN_BASE}: checkpoint was trained for task 'can', not 'pointmass'" in error_of(capsys)


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_dataset_is_refused(method, tiny_policy, tmp_path, capsys):
    empty = write_episodes(tmp_path / "empty.hdf5", [], POINTMASS_META)
    assert main(train_command(method, empty, tmp_path / "runs", task="pointmass", base=tiny_policy)) == 2
    err = error_of(capsys)
    assert "empty.hdf5" in err and ("no episodes" in err or "no successful episodes" in err or
                                    "no training states" in err), err


@pytest.mark.parametrize("method", METHODS)
def test_actions_outside_the_unit_box_are_refused(method, demos, tiny_policy, tmp_path, capsys):
    episodes, _ = load_dataset(demos)
    big = write_episodes(tmp_path / "big.hdf5", scaled_actions(episodes, 3.0), POINTMASS_META)
    assert main(train_command(method, big, tmp_path / "runs", task="pointmass", base=tiny_policy)) == 2
    err = error_of(capsys)
    assert f"{big}: episode 0: field 'actions' holds" in err and "must lie in [-1, 1]" in err, err


@pytest.mark.parametrize("column", ["observation.state", "action"])
def test_nan_inside_a_lerobot_parquet_is_refused_naming_the_episode(demos, tmp_path, capsys, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    episodes, _ = load_dataset(demos)
    root = save_dataset(episodes[:3], tmp_path / "demos_lerobot", env_meta=POINTMASS_META)
    data_file = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data_file)
    rows = table.column(column).to_pylist()
    second_episode = table.column("episode_index").to_pylist().index(1)
    rows[second_episode + 2] = [float("nan")] * len(rows[second_episode + 2])
    index = table.column_names.index(column)
    table = table.set_column(index, column, pa.array(rows, type=table.schema.field(column).type))
    pq.write_table(table, data_file)

    field = "observation 'agent_pos'" if column == "observation.state" else "field 'actions'"
    with pytest.raises(DatasetError, match=f"episode 1: {field} contains NaN"):
        load_dataset(root)
    assert main(["train", "bc", "--task=pointmass", f"--dataset={root}", f"--runs-dir={tmp_path / 'runs'}",
                 *TINY_BC]) == 2
    assert f"{root}: episode 1: {field} contains NaN" in error_of(capsys)


# --- eval --video (the eval command's output folder is being reworked: see the report of issue 22) ----------------------

def _rendering_available() -> bool:
    from robofinetune.envs import make_env

    try:
        make_env("pointmass", render=True).close()
        return True
    except Exception:  # noqa: BLE001 - no GL on this machine
        return False


@pytest.mark.skipif(not _rendering_available(), reason="no offscreen OpenGL (set MUJOCO_GL=egl or osmesa)")
def test_eval_video_writes_one_video_per_episode_up_to_the_limit_and_never_into_the_policy(tiny_policy, tmp_path,
                                                                                            monkeypatch):
    policy = tmp_path / "policies" / "pointmass" / "tiny"
    shutil.copytree(tiny_policy, policy)
    before = sorted(path.relative_to(policy) for path in policy.rglob("*"))
    monkeypatch.chdir(tmp_path)   # a default run folder lands here
    assert main(["eval", "--task=pointmass", f"--policy={policy}", "--episodes=3", "--num-envs=1", "--video",
                 "--video-episodes=2"]) == 0
    assert sorted(path.relative_to(policy) for path in policy.rglob("*")) == before   # the policy is untouched
    videos = list(tmp_path.rglob("*.mp4"))
    assert len(videos) == 2 and len({video.parent for video in videos}) == 1, videos   # 3 episodes, limit 2
    assert all(video.stat().st_size > 0 for video in videos)

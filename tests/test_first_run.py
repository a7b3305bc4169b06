"""What a new user meets (issue 15): demos collected in parallel env processes exactly as in one, eval output kept
out of the policy folder, robosuite's start-up chatter kept off the terminal (in the run's log, on screen with
--verbose), and the commands printed at the end of a training run being real command lines."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robofinetune.cli import build_parser, main, next_steps
from robofinetune.data.collect import collect_episodes
from robofinetune.data.io import load_dataset, save_dataset
from robofinetune.logs import LOG_FILE_ENV, VERBOSE_ENV

REPO = Path(__file__).resolve().parents[1]


def assert_same_episodes(first, second) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.metadata == b.metadata
        assert a.success == b.success
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)
        np.testing.assert_array_equal(a.terminals, b.terminals)
        assert a.observations.keys() == b.observations.keys()
        for key in a.observations:
            np.testing.assert_array_equal(a.observations[key], b.observations[key])
            np.testing.assert_array_equal(a.final_observation[key], b.final_observation[key])


# --- collect in parallel ----------------------------------------------------------------------------------------------

def test_parallel_collection_gives_the_serial_episodes_in_the_serial_order():
    # only_success with noise: some attempts fail and are skipped, and the workers run ahead of the last success
    serial = collect_episodes("pointmass", 10, noise=1.5, seed=3, only_success=True, progress=False)
    parallel = collect_episodes("pointmass", 10, noise=1.5, seed=3, only_success=True, progress=False, num_envs=2)
    assert [e.metadata["attempt"] for e in serial] != list(range(10))  # failures were skipped
    assert_same_episodes(serial, parallel)
    keeping_failures = collect_episodes("pointmass", 7, noise=2.5, seed=0, progress=False, num_envs=3)
    assert_same_episodes(collect_episodes("pointmass", 7, noise=2.5, seed=0, progress=False), keeping_failures)
    assert not all(e.success for e in keeping_failures)


def test_collect_command_writes_the_same_dataset_with_any_number_of_env_processes(tmp_path):
    outputs = {}
    for envs in (1, 2):
        outputs[envs] = tmp_path / f"demos_{envs}.hdf5"
        assert main(["collect", "--task=pointmass", "--episodes=5", "--seed=4", f"--num-envs={envs}",
                     f"--output={outputs[envs]}"]) == 0
    (one, meta_one), (two, meta_two) = load_dataset(outputs[1]), load_dataset(outputs[2])
    assert meta_one == meta_two
    assert_same_episodes(one, two)


# --- eval output ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pointmass_policy(tmp_path_factory) -> Path:
    """A (poor) pointmass diffusion policy from a few BC steps."""
    folder = tmp_path_factory.mktemp("first_run")
    demos = save_dataset(collect_episodes("pointmass", 6, seed=1, progress=False), folder / "demos.hdf5",
                         env_meta={"env_name": "pointmass", "task": "pointmass"})
    runs = folder / "runs"
    assert main(["train", "bc", "--task=pointmass", f"--dataset={demos}", f"--runs-dir={runs}", "--max-steps=5",
                 "--batch-size=16", "--hidden-dim=16", "--depth=1", "--n-obs-steps=1", "--horizon=4",
                 "--n-action-steps=2", "--warmup-steps=1", "--eval-episodes=0"]) == 0
    return next(runs.iterdir()) / "policy"


def files_under(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(path.relative_to(folder)), path.stat().st_size) for path in folder.rglob("*") if path.is_file())


def test_eval_writes_its_report_to_a_run_folder_or_out_never_into_the_policy(pointmass_policy, tmp_path, capsys):
    before = files_under(pointmass_policy)
    runs = tmp_path / "runs"
    assert main(["eval", "--task=pointmass", f"--policy={pointmass_policy}", "--episodes=3", "--num-envs=1",
                 f"--runs-dir={runs}"]) == 0
    (run,) = runs.iterdir()
    assert run.name.endswith("_eval_pointmass")
    report = json.loads((run / "eval.json").read_text())
    assert report["episodes"] == 3 and report["policy"] == str(pointmass_policy)
    assert f"report: {run / 'eval.json'}" in capsys.readouterr().out
    out = tmp_path / "my_eval"
    assert main(["eval", "--task=pointmass", f"--policy={pointmass_policy}", "--episodes=2", "--num-envs=1",
                 f"--out={out}"]) == 0
    assert json.loads((out / "eval.json").read_text())["episodes"] == 2
    assert files_under(pointmass_policy) == before
    assert len(list(runs.iterdir())) == 1  # --out made no run folder


# --- robosuite's chatter ----------------------------------------------------------------------------------------------

ROBOSUITE_LINE = "Loading controller configuration"   # robosuite's INFO line when a Panda controller is set up
IMPORT_AND_CONFIGURE = ("from robofinetune.envs.robosuite_env import resolve_controller_configs; "
                        "resolve_controller_configs('OSC_POSE', 'Panda'); print('configured')")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in (LOG_FILE_ENV, VERBOSE_ENV)}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=300)


def test_robosuite_start_up_lines_go_to_the_log_file_and_to_the_terminal_only_when_verbose(tmp_path):
    log = tmp_path / "robosuite.log"
    quiet = run_python(IMPORT_AND_CONFIGURE, **{LOG_FILE_ENV: str(log)})
    assert quiet.returncode == 0 and "configured" in quiet.stdout, quiet.stderr
    assert "robosuite" not in quiet.stderr, quiet.stderr
    assert ROBOSUITE_LINE in log.read_text()
    verbose = run_python(IMPORT_AND_CONFIGURE, **{VERBOSE_ENV: "1"})
    assert verbose.returncode == 0, verbose.stderr
    assert ROBOSUITE_LINE in verbose.stderr


@pytest.mark.slow
def test_env_worker_processes_log_to_the_run_file_not_the_terminal(tmp_path):
    """Every env process (forked for eval, forkserver for collect) writes its lines to the file, none to stderr."""
    log = tmp_path / "robosuite.log"
    code = ("import numpy as np\n"
            "from robofinetune.envs import make_vector_env\n"
            "from robofinetune.data.collect import collect_episodes\n"
            "if __name__ == '__main__':\n"
            "    envs = make_vector_env('can', num_envs=2, seed=0)\n"
            "    envs.reset(seed=0); envs.step(np.zeros((2, 7), np.float32)); envs.close()\n"
            "    collect_episodes('can', 2, seed=0, progress=False, num_envs=2)\n"
            "    print('done')\n")
    script = tmp_path / "workers.py"
    script.write_text(code)
    result = run_python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')",
                        **{LOG_FILE_ENV: str(log)})
    assert result.returncode == 0 and "done" in result.stdout, result.stderr
    assert "robosuite" not in result.stderr, result.stderr
    pids = {line.split(" pid ")[1].split()[0] for line in log.read_text().splitlines() if ROBOSUITE_LINE in line}
    assert len(pids) == 4, log.read_text()   # 2 vector-env workers + 2 collect workers


def test_verbose_is_taken_anywhere_on_the_line_and_does_not_outlive_the_command(tmp_path):
    assert VERBOSE_ENV not in os.environ
    assert main(["collect", "--task=pointmass", "--episodes=1", "--num-envs=1", "--verbose",
                 f"--output={tmp_path / 'one.hdf5'}"]) == 0
    assert VERBOSE_ENV not in os.environ and LOG_FILE_ENV not in os.environ


# --- what to run next -------------------------------------------------------------------------------------------------

def parse_command_line(line: str):
    words = shlex.split(line.split("#")[0])
    assert words[0] == "robofinetune", line
    parser = build_parser(words[1])
    args, extra = parser.parse_known_args(words[1:])
    return args, extra


@pytest.mark.parametrize("method", ["residual", "ogpo", "bc"])
def test_the_next_steps_after_training_are_command_lines_the_cli_accepts(method, tmp_path):
    import importlib

    from robofinetune.cli import TRAIN_METHODS

    config = importlib.import_module(TRAIN_METHODS[method]).Config(task="can")
    run = tmp_path / f"20260101-000000_{method}_can"
    lines = next_steps(method, config, run)
    commands = [line.strip() for line in lines if line.strip().startswith("robofinetune ")]
    seen = {}
    for line in commands:
        args, extra = parse_command_line(line)
        seen[args.command] = args
        if args.command != "train":
            assert not extra, line   # only `train` takes free --field=value flags
    policy = str(run / "policy")
    assert seen["eval"].policy == policy and seen["eval"].task == "can" and seen["eval"].video
    assert seen["distill"].teacher == policy
    if method != "bc":  # the RL methods: gate against the base, then deploy with the base as incumbent
        assert set(seen) == {"eval", "gate", "distill", "deploy"}
        base = str(REPO / "policies" / "can" / "weak_diffusion")
        assert Path(seen["gate"].candidate) == Path(policy) and Path(seen["gate"].incumbent).resolve() == Path(base)
        assert Path(seen["gate"].data).name == "can_scripted_200.hdf5"
        assert Path(seen["deploy"].robot).resolve() == REPO / "real_robot" / "can_twin.yaml"
        assert seen["deploy"].policy == policy and seen["deploy"].incumbent == seen["gate"].incumbent
        assert any("mujoco_twin_node.py --robot" in line for line in lines)
    else:
        assert set(seen) == {"eval", "train", "distill"} and seen["train"].method == "residual"

"""Consistency distillation: the one-step student policy kind and the distillation trainer."""

import json

import numpy as np
import pytest
import torch

from robofinetune.algos.distill import DistillConfig, TeacherTargets, build_student, train_distill
from robofinetune.errors import ConfigError
from robofinetune.policies import POLICY_TYPES, Policy, load_policy, save_policy
from robofinetune.policies.consistency import ConsistencyPolicy
from robofinetune.runs import Run

OBS_KEYS = ["agent_pos", "agent_vel", "goal_pos"]   # pointmass's layout, so toy teachers also drive the env


def toy_teacher(kind: str, **overrides):
    policy_class, config_class = POLICY_TYPES[kind]
    config = config_class(task="pointmass", obs_keys=OBS_KEYS, obs_shapes={key: [2] for key in OBS_KEYS},
                          action_dim=2, n_obs_steps=2, horizon=4, n_action_steps=2, hidden_dim=32, depth=1,
                          inference_steps=5, **overrides)
    policy = policy_class(config)
    generator = np.random.default_rng(0)
    policy.set_normalizers(generator.uniform(-0.3, 0.3, (100, 6)), generator.uniform(-1, 1, (100, 2)))
    return policy.eval()


def toy_obs(batch: int = 3, seed: int = 1):
    generator = np.random.default_rng(seed)
    return {key: generator.uniform(-0.3, 0.3, (batch, 2, 2)).astype(np.float32) for key in OBS_KEYS}


def toy_student(kind: str, **overrides) -> tuple[Policy, ConsistencyPolicy]:
    teacher = toy_teacher(kind)
    config = DistillConfig(task="pointmass", teacher="in-memory", **overrides)
    return teacher, build_student(teacher, config, toy_obs(2)).eval()


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_one_step_output_is_deterministic_given_the_noise(kind):
    _, student = toy_student(kind)
    for parameter in student.denoiser.parameters():   # a non-trivial student (the diffusion head starts at 0)
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    obs, noise = toy_obs(), torch.randn(3, 4, 2)
    first = student.sample(obs, noise=noise)
    assert first.actions.shape == (3, 4, 2)
    assert torch.equal(first.actions, student.sample(obs, noise=noise).actions)
    assert not torch.equal(first.actions, student.sample(obs, noise=torch.randn(3, 4, 2)).actions)
    # act() executes the teacher's chunking; one network call per chunk
    calls = []
    student.denoiser.net.register_forward_hook(lambda *args: calls.append(1))   # the MLP trunk
    assert student.act(obs).shape == (3, 2, 2) and len(calls) == 1


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_boundary_condition_makes_f_the_identity_at_the_end_of_the_ode(kind):
    _, student = toy_student(kind)
    x, condition = torch.randn(3, 4, 2), student.encode_observation(toy_obs())
    end_time = 0.0 if kind == "diffusion" else 1.0
    with torch.no_grad():
        assert torch.allclose(student.consistency_function(x, torch.full((3,), end_time), condition), x, atol=1e-6)
        start = student.consistency_function(x, torch.full((3,), student.config.grid[0]), condition)
    assert not torch.allclose(start, x, atol=1e-3)


def test_student_uses_the_teachers_time_convention():
    """Started from the teacher, an epsilon student's f(z, t0) is the teacher's own first x0 estimate (diffusion),
    and a flow student's is the teacher's one Euler step: the grids and time scalings line up."""
    teacher, student = toy_student("diffusion")
    obs, noise = toy_obs(), torch.randn(3, 4, 2)
    condition = teacher.encode_observation(obs)
    student.config.prediction = "epsilon"
    student.denoiser.load_state_dict(teacher.denoiser.state_dict())
    scheduler = teacher._ddim(5)
    first = int(scheduler.timesteps[0])
    assert student.config.grid == [float(t) for t in scheduler.timesteps] and first == student.config.grid[0]
    with torch.no_grad():
        eps = teacher.denoiser(noise, torch.full((3,), first), condition)
        alpha_bar = scheduler.alphas_cumprod[first]
        expected = (noise - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        got = student.consistency_function(noise, torch.full((3,), float(first)), condition)
    assert torch.allclose(got, expected, atol=1e-4)

    teacher, student = toy_student("flow")
    with torch.no_grad():
        one_euler_step = teacher.sample(obs, steps=1, noise=noise).actions
        assert torch.allclose(student.sample(obs, noise=noise).actions, one_euler_step, atol=1e-5)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_cached_time_embedding_equals_the_full_network_and_follows_weight_changes(kind):
    _, student = toy_student(kind)
    for parameter in student.denoiser.parameters():
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    obs, noise = toy_obs(), torch.randn(3, 4, 2)
    start = torch.full((3,), student.config.grid[0])

    def full_network():   # the tensor-time path runs MLPDenoiser.forward itself
        return student.consistency_function(noise, start, student.encode_observation(obs))

    with torch.no_grad():
        fast = student.consistency_function(noise, student.config.grid[0], student.encode_observation(obs))
        assert torch.allclose(fast, full_network(), atol=1e-6)
        for parameter in student.denoiser.time_embedding.parameters():
            parameter.add_(0.5)
        changed = student.consistency_function(noise, student.config.grid[0], student.encode_observation(obs))
        assert torch.allclose(changed, full_network(), atol=1e-6) and not torch.allclose(changed, fast, atol=1e-4)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_checkpoint_round_trip(kind, tmp_path):
    _, student = toy_student(kind, steps=2)
    for parameter in student.denoiser.parameters():
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    path = save_policy(student, tmp_path / "student", {"teacher": "toy"})
    loaded = load_policy(path, device="cpu", task="pointmass")
    assert isinstance(loaded, ConsistencyPolicy) and loaded.kind == "consistency"
    assert loaded.config == student.config and loaded.config.inference_steps == 2
    obs, noise = toy_obs(), torch.randn(3, 4, 2)
    assert torch.equal(loaded.sample(obs, steps=1, noise=noise).actions, student.sample(obs, steps=1, noise=noise).actions)
    # multi-step sampling re-noises: same generator seed -> same chunk
    first = loaded.sample(obs, noise=noise, generator=torch.Generator().manual_seed(3)).actions
    second = student.sample(obs, noise=noise, generator=torch.Generator().manual_seed(3)).actions
    assert torch.equal(first, second)
    assert torch.equal(loaded.action_normalizer.high, student.action_normalizer.high)


@pytest.mark.parametrize("steps", [1, 3])
def test_chain_log_prob_is_the_density_of_each_stochastic_transition(steps):
    _, student = toy_student("diffusion")
    for parameter in student.denoiser.parameters():
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    obs = toy_obs()
    with torch.no_grad():
        chain = student.sample(obs, steps=steps, return_chain=True, stochastic=True).chain
        log_prob = student.chain_log_prob(obs, chain)
        assert chain.shape == (3, steps + 1, 4, 2) and log_prob.shape == (3, steps)
        times = student.sampling_times(steps)
        condition = student.encode_observation(obs)
        end = student.consistency_function(chain[:, 0], torch.full((3,), times[0]), condition).clamp(-1, 1)
        if steps == 1:
            mean, std = end, student.config.chain_min_std
        else:
            alpha_bar = student.alphas_cumprod[int(times[1])]
            mean, std = alpha_bar.sqrt() * end, max(float((1 - alpha_bar).sqrt()), student.config.chain_min_std)
        expected = torch.distributions.Normal(mean, std).log_prob(chain[:, 1]).sum(dim=(1, 2))
    assert torch.allclose(log_prob[:, 0], expected, atol=1e-3)


def test_bad_steps_are_named():
    _, student = toy_student("flow")
    with pytest.raises(ConfigError, match="consistency steps must be between 1 and 5"):
        student.sample(toy_obs(), steps=6)
    with pytest.raises(ConfigError, match="'steps' is 9"):
        toy_student("flow", steps=9)


class OffsetComposite(Policy):
    """A composite teacher: a generative base plus a fixed correction of its first action (like a residual)."""

    kind = "offset_composite"

    def __init__(self, base):
        super().__init__()
        self.base, self.config = base, base.config

    def act(self, obs):
        return np.clip(self.base.act(obs)[:, :1] + 0.3, -1, 1)

    def select_action(self, obs):
        return np.clip(self.base.select_action(obs) + 0.3, -1, 1)

    def reset(self, env_index=None):
        self.base.reset(env_index)


def test_composite_teacher_targets_are_its_act_outputs_from_the_same_base_noise():
    base = toy_teacher("flow")
    composite = OffsetComposite(base)
    obs, noise = toy_obs(), torch.randn(3, 4, 2)
    chain, target = TeacherTargets(composite, 5)(obs, noise)
    plain_chain, plain_target = TeacherTargets(base, 5)(obs, noise)
    assert torch.allclose(chain, plain_chain)                       # the base's ODE trajectory from that noise
    base_first = base.sample(obs, steps=5, noise=noise).actions[:, :1].clamp(-1, 1)
    executed = base.action_normalizer.normalize((base_first + 0.3).clamp(-1, 1))
    assert torch.allclose(target[:, :1], executed, atol=1e-5)       # what the composite executes
    assert torch.allclose(target[:, 1:], plain_target[:, 1:])       # the rest of the horizon: the base's chunk
    assert "sample" not in vars(base)                               # the noise pin is undone
    student = build_student(composite, DistillConfig(task="pointmass", teacher="x"), obs)
    assert student.config.n_action_steps == 1 and not student.config.clip_output


def test_residual_composite_teacher_and_a_residual_on_a_student(tmp_path):
    """The toolkit's own composite (base + residual actor): the student copies its act(), which corrects the
    base's first action; and a student can itself be the frozen base of a residual policy."""
    from robofinetune.algos.residual import ResidualPolicy, ResidualPolicyConfig

    def residual_on(base):
        config = ResidualPolicyConfig(task="pointmass", obs_keys=OBS_KEYS, obs_shapes={key: [2] for key in OBS_KEYS},
                                      action_dim=2, hidden_dim=16, depth=1, base_kind=base.kind)
        return ResidualPolicy(config, base=base).eval()

    base = toy_teacher("diffusion")
    composite = residual_on(base)
    for parameter in composite.actor.parameters():   # a fine-tuned residual: non-zero corrections
        parameter.data.add_(0.5 * torch.randn_like(parameter))
    obs = toy_obs()
    torch.manual_seed(7)
    noise = torch.randn(3, 4, 2)
    torch.manual_seed(7)                              # the base's own act() draws that same noise
    executed = torch.as_tensor(composite.act(obs))
    chain, target = TeacherTargets(composite, base.config.inference_steps)(obs, noise)
    assert torch.allclose(target[:, 0], base.action_normalizer.normalize(executed[:, 0]), atol=1e-5)
    base_first = base.sample(obs, noise=noise).actions[:, 0].clamp(-1, 1)
    assert not torch.allclose(executed[:, 0], base_first, atol=1e-3)   # the residual really acted

    student = build_student(composite, DistillConfig(task="pointmass", teacher="x"), obs).eval()
    assert student.config.n_action_steps == 1
    on_student = residual_on(student)
    path = save_policy(on_student, tmp_path / "residual_on_student")
    loaded = load_policy(path, device="cpu")
    assert loaded.kind == "residual" and isinstance(loaded.base, ConsistencyPolicy)
    frame = {key: value[:, -1] for key, value in obs.items()}
    assert loaded.select_action(frame).shape == (3, 2)


def test_consistency_student_is_refused_as_a_teacher():
    _, student = toy_student("flow")
    with pytest.raises(ConfigError, match="consistency student already"):
        TeacherTargets(student, 5)


# --- end to end on the fast task ----------------------------------------------------------------------------------

TEACHER_STEPS = 800


@pytest.fixture(scope="module")
def pointmass_teacher(tmp_path_factory):
    """A small diffusion BC policy on 40 scripted demos (the integration test's recipe, shortened). Diffusion,
    because its own one-step sampler fails on pointmass (a flow teacher's single Euler step nearly succeeds)."""
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import save_dataset

    folder = tmp_path_factory.mktemp("distill")
    dataset = folder / "pointmass_demos.hdf5"
    save_dataset(collect_episodes("pointmass", 40, seed=1, progress=False), dataset,
                 env_meta={"env_name": "pointmass", "task": "pointmass"})
    config = BCConfig(task="pointmass", policy="diffusion", dataset=str(dataset), max_steps=TEACHER_STEPS, batch_size=128,
                      hidden_dim=128, depth=2, n_obs_steps=1, horizon=4, n_action_steps=2, eval_episodes=0,
                      warmup_steps=50, learning_rate=1e-3, checkpoint_every=10**9, inference_steps=10)
    run = Run.create("bc", "pointmass", config, root=folder / "runs")
    summary = train_bc(config, run, progress=False)
    return summary["policy_path"], dataset



def test_distilled_student_keeps_most_of_the_teachers_success(pointmass_teacher, tmp_path):
    from robofinetune.eval import evaluate_policy

    teacher_path, dataset = pointmass_teacher
    config = DistillConfig(task="pointmass", teacher=str(teacher_path), max_steps=150, batch_size=64,
                           rollout_episodes=10, rollout_envs=1, eval_episodes=0, warmup_steps=20, log_every=10,
                           checkpoint_every=10**9, torch_threads=1)
    run = Run.create("distill", "pointmass", config, root=tmp_path)
    summary = train_distill(config, run, progress=False)
    assert summary["training_states"]["demos"] > 0 and summary["training_states"]["rollouts"] > 0
    student = load_policy(summary["policy_path"], device="cpu")
    assert isinstance(student, ConsistencyPolicy) and student.config.inference_steps == 1
    metrics = run.metrics()
    assert metrics[-1]["train/one_step_mse"] < 0.5 * metrics[0]["train/one_step_mse"]

    untrained = build_student(load_policy(teacher_path, device="cpu"),
                              DistillConfig(task="pointmass", teacher="x", init_from_teacher=False),
                              {key: np.zeros((2, 1, 2), np.float32) for key in OBS_KEYS})
    teacher_one_step = load_policy(teacher_path, device="cpu")
    teacher_one_step.config.inference_steps = 1
    results = {name: evaluate_policy(policy, "pointmass", episodes=30, num_envs=1, progress=False).success_rate
               for name, policy in (("teacher", load_policy(teacher_path, device="cpu")), ("student", student),
                                    ("untrained", untrained.eval()), ("teacher_ddim_1", teacher_one_step))}
    threshold = max(0.5, results["teacher"] - 0.25)
    assert results["teacher"] >= 0.6, results
    assert results["student"] >= threshold, results
    # neither an untrained student nor the teacher's own one-step sampler gets there
    assert results["untrained"] < threshold and results["teacher_ddim_1"] < threshold, results


def test_cli_runs_and_resumes(pointmass_teacher, tmp_path, capsys):
    from robofinetune.cli import main

    teacher_path, _ = pointmass_teacher
    assert main(["distill", f"--teacher={teacher_path}", "--steps=2", f"--runs-dir={tmp_path}", "--max-steps=20",
                 "--rollout-episodes=0", "--eval-episodes=0", "--checkpoint_every=10", "--batch-size=16"]) == 0
    run = next(tmp_path.iterdir())
    saved = (run / "config.yaml").read_text()
    assert "task: pointmass" in saved and "steps: 2" in saved      # the task came from the teacher
    (run / "config.yaml").write_text(saved.replace("max_steps: 20", "max_steps: 30"))
    assert main(["distill", f"--resume={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_steps"] == 30
    assert load_policy(run / "policy").config.inference_steps == 2
    assert main(["distill", "--task=pointmass"]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["distill", f"--teacher={teacher_path}", "--batch-size=many", f"--runs-dir={tmp_path}"]) == 2
    assert "batch_size" in capsys.readouterr().err

"""Fine-tuning image policies on pointmass_image: residual RL on frozen encoder features, the one-step student of
an image teacher, and the gate's FQE on image data."""

import copy

import numpy as np
import pytest
import torch
from pixels_common import expert_image_demos

from robofinetune.algos.bc import BCConfig, train_bc
from robofinetune.algos.residual import ResidualConfig, ResidualPolicy, train
from robofinetune.data.io import save_dataset
from robofinetune.errors import CheckpointError
from robofinetune.policies import load_policy
from robofinetune.rl import ReplayBuffer, RunLoop
from robofinetune.rl.features import BASE_ENCODER, replay_row_bytes
from robofinetune.runs import Run

TASK = "pointmass_image"


@pytest.fixture(scope="module")
def image_base(tmp_path_factory):
    """A small, poor diffusion base that reads the 32x32 camera, and its demos."""
    folder = tmp_path_factory.mktemp("image_base")
    episodes = expert_image_demos(6, seed=0)
    dataset = save_dataset(episodes, folder / "demos.hdf5", env_meta={"env_name": TASK, "task": TASK})
    config = BCConfig(task=TASK, dataset=str(dataset), max_steps=30, hidden_dim=32, depth=1, batch_size=32,
                      n_obs_steps=1, horizon=4, n_action_steps=2, encoder="conv", image_feature_dim=16,
                      augmentation="none", warmup_steps=5, eval_episodes=0, checkpoint_every=10**9,
                      accelerator="cpu")
    run = Run.create("bc", TASK, config, root=folder / "runs")
    train_bc(config, run, progress=False)
    return run.path / "policy", dataset


def image_obs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"agent_pos": rng.uniform(-0.3, 0.3, (batch, 2)).astype(np.float32),
            "agent_vel": rng.uniform(-0.3, 0.3, (batch, 2)).astype(np.float32),
            "top_image": rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)}


def tiny_config(base, dataset, **overrides):
    values = dict(task=TASK, base=str(base), dataset=str(dataset), total_env_steps=200, num_envs=1,
                  critic_hidden_dim=32, num_critics=3, actor_hidden_dim=32, batch_size=32, updates_per_step=0.5,
                  warmup_steps=40, eval_every=0, eval_episodes=1, final_eval_episodes=1, eval_envs=1,
                  checkpoint_every=100, log_every=50, progress=False)
    values.update(overrides)
    return ResidualConfig(**values)


def test_residual_on_an_image_base_stores_features_acts_from_images_and_resumes(image_base, tmp_path, monkeypatch):
    base_path, dataset = image_base
    config = tiny_config(base_path, dataset)
    run = Run.create("residual", TASK, config, root=tmp_path)
    saved = {}
    original_save = RunLoop.save_checkpoint

    def recording_save(self, state, buffers):
        saved[self.env_steps] = {name: copy.deepcopy(buffer.state_dict()) for name, buffer in buffers.items()}
        return original_save(self, state, buffers)

    monkeypatch.setattr(RunLoop, "save_checkpoint", recording_save)
    summary = train(config, run)
    assert summary["env_steps"] == 200 and summary["replay_features"] == BASE_ENCODER

    policy = load_policy(run.path / "policy", task=TASK)
    assert isinstance(policy, ResidualPolicy) and policy.config.features == BASE_ENCODER
    feature_dim = policy.base.obs_encoder.output_dim          # 16 image features + 4 normalised state
    assert policy.config.feature_dim == feature_dim == 20
    assert summary["replay_bytes_per_transition"] == replay_row_bytes(feature_dim, 2)

    # replay rows hold float32 features and the base action, never pixels; and they equal a fresh encoder pass
    online = saved[200]["online"]
    assert online["obs"].dtype == np.float32 and online["obs"].shape == (200, feature_dim + 2)
    offline = saved[200]["offline"]
    assert offline["obs"].shape[1] == feature_dim + 2
    from robofinetune.data.io import load_dataset

    demos, _ = load_dataset(dataset, obs_keys=policy.config.obs_keys)
    first = demos[0]
    with torch.no_grad():
        fresh = policy.base.obs_encoder({key: torch.as_tensor(value[:, None]) for key, value in
                                         first.observations.items()})[:, 0].numpy()
    assert np.allclose(offline["obs"][: len(first), :feature_dim], fresh, atol=1e-5)

    # the exported policy acts from raw images: base action + residual computed by hand
    torch.nn.init.normal_(policy.actor.net[-1].weight, std=0.5)
    obs = image_obs()
    history = {key: value[:, None] for key, value in obs.items()}
    torch.manual_seed(3)
    action = policy.act(history)[:, 0]
    torch.manual_seed(3)
    base_action = policy.base.act(history)[:, 0]
    with torch.no_grad():
        features = policy.base.obs_encoder.eval()({key: torch.as_tensor(value) for key, value in history.items()})
        x = torch.cat([features[:, 0], torch.as_tensor(base_action)], dim=1)
        residual = policy.actor(x).numpy()
    assert np.abs(residual).max() > 1e-4
    assert np.allclose(action, np.clip(base_action + residual, -1, 1), atol=1e-5)
    assert policy.select_action(obs).shape == (2, 2)

    # resume: extends the run from its checkpoint, buffers of features restored as saved
    longer = tiny_config(base_path, dataset, total_env_steps=240)
    restored = {}
    original_load = RunLoop.load_checkpoint

    def recording_load(self, buffers):
        state = original_load(self, buffers)
        restored.update({name: copy.deepcopy(buffer.state_dict()) for name, buffer in buffers.items()})
        return state

    monkeypatch.setattr(RunLoop, "load_checkpoint", recording_load)
    assert train(longer, Run.open(run.path), resume=True)["env_steps"] == 240
    for name in ("offline", "online"):
        for key in ReplayBuffer._ARRAYS:
            assert np.array_equal(saved[200][name][key], restored[name][key]), (name, key)


def test_resume_with_another_base_is_refused(image_base, tmp_path):
    base_path, dataset = image_base
    config = tiny_config(base_path, dataset, total_env_steps=100, warmup_steps=100, checkpoint_every=100)
    run = Run.create("residual", TASK, config, root=tmp_path)
    train(config, run)
    other = tmp_path / "other_base"
    other_policy = load_policy(base_path, device="cpu")
    torch.nn.init.normal_(next(other_policy.obs_encoder.parameters()), std=0.1)
    from robofinetune.policies import save_policy

    save_policy(other_policy, other, {})
    with pytest.raises(CheckpointError, match="another base policy.*'base'"):
        train(tiny_config(other, dataset, total_env_steps=200, warmup_steps=100), Run.open(run.path), resume=True)


def test_distilled_image_student_reads_images_with_the_teachers_encoder(image_base, tmp_path):
    from robofinetune.algos.distill import DistillConfig, build_student, train_distill
    from robofinetune.policies.consistency import ConsistencyPolicy

    base_path, dataset = image_base
    teacher = load_policy(base_path, device="cpu")
    probe = {key: value[:, None] for key, value in image_obs().items()}
    student = build_student(teacher, DistillConfig(task=TASK, teacher="x"), probe)
    assert student.config.encoder == teacher.config.encoder and student.config.image_feature_dim == 16
    for (name, mine), (_, theirs) in zip(student.obs_encoder.state_dict().items(),
                                         teacher.obs_encoder.state_dict().items()):
        assert torch.equal(mine, theirs), name          # initialised from the teacher's encoder
    fresh = build_student(teacher, DistillConfig(task=TASK, teacher="x", init_from_teacher=False), probe)
    weight = "image_encoders.top_image.backbone.projection.0.weight"
    assert not torch.equal(fresh.obs_encoder.state_dict()[weight], teacher.obs_encoder.state_dict()[weight])

    config = DistillConfig(task=TASK, teacher=str(base_path), dataset=str(dataset), max_steps=10, batch_size=16,
                           rollout_episodes=0, eval_episodes=0, warmup_steps=2, log_every=5,
                           checkpoint_every=10**9, torch_threads=1, accelerator="cpu")
    summary = train_distill(config, Run.create("distill", TASK, config, root=tmp_path), progress=False)
    assert summary["student_latency_ms"] > 0 and summary["teacher_latency_ms"] > 0
    assert summary["latency_ratio"] == pytest.approx(summary["teacher_latency_ms"] / summary["student_latency_ms"])
    loaded = load_policy(summary["policy_path"], device="cpu", task=TASK)
    assert isinstance(loaded, ConsistencyPolicy)
    images = image_obs(seed=1)
    chunk = loaded.act({key: value[:, None] for key, value in images.items()})
    other = dict(images, top_image=255 - images["top_image"])   # the action depends on the image
    assert chunk.shape == (2, 2, 2)
    assert not np.allclose(chunk, loaded.act({key: value[:, None] for key, value in other.items()}))


def test_gate_fits_fqe_on_image_features_not_pixels(image_base):
    from robofinetune.algos.ope import GateConfig, build_chunk_windows, gate_policies, history_encoder
    from robofinetune.data.io import load_dataset
    from robofinetune.errors import ConfigError

    base_path, dataset = image_base
    base = load_policy(base_path, device="cpu")
    episodes, _ = load_dataset(dataset, obs_keys=base.config.obs_keys)
    windows = build_chunk_windows(episodes, base.config.obs_keys, 1, 2, 0.99, history_encoder(base))
    assert windows.histories["top_image"].dtype == np.uint8
    assert windows.state_obs.dtype == np.float32 and windows.state_obs.shape[1] == 20   # not 32 * 32 * 3 + 4
    with pytest.raises(ConfigError, match="top_image"):
        build_chunk_windows(episodes, base.config.obs_keys, 1, 2, 0.99)

    from robofinetune.algos.residual import ResidualPolicyConfig
    from robofinetune.envs import load_task_spec

    spec = load_task_spec(TASK)
    candidate = ResidualPolicy(ResidualPolicyConfig(task=TASK, obs_keys=spec.obs_keys, action_dim=2, hidden_dim=16,
                                                    obs_shapes={k: list(v) for k, v in spec.obs_shapes.items()},
                                                    features=BASE_ENCODER), base=copy.deepcopy(base))
    torch.nn.init.normal_(candidate.actor.net[-1].weight, std=0.5)
    result = gate_policies(candidate, base, episodes, GateConfig(heads=3, iterations=3, steps_per_iteration=5,
                                                                 batch_size=32, device="cpu"))
    assert result.decision in ("PROMOTE", "REJECT") and np.isfinite(result.gain)

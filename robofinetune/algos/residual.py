"""Residual off-policy RL on a frozen base policy (ResFiT, arXiv 2509.19301), from a sparse 0/1 success reward.

    executed action  a = clip(b + r, -1, 1),  b = base action (frozen BC policy, action chunks),
                                              r = action_scale * tanh(actor(s, b)), last layer zero-initialised
    RL state         x = (flat task observation s, base action b)   -- b carries the base's chunk context
    replay           half demos (base actions relabelled by running the base over them), half online
    critic update    y = n-step reward + g^k * min over a random 2 of 10 target heads of
                         Q'(x', clip(b' + r'(x') + clipped noise))            (REDQ, target smoothing)
                     loss = sum over heads of mean (Q_h(x, a) - y)^2, LayerNorm critics, UTD > 1
    actor update     every 2nd critic update: maximise mean_h Q_h(x, clip(b + r(x))); Polyak 0.005
    warm-up          first ``warmup_steps`` env steps: base + uniform noise acts, only the critic learns

The update step is :func:`td3_update`; the loop is :func:`train`; one acting step (base + residual + noise, the
env step, the replay row) is :class:`robofinetune.rl.residual_acting.ResidualActing`, which the Ray policy workers
(``--num-env-workers=N --rollout-in-workers``, :mod:`robofinetune.distributed.policy_workers`) and the robot actor
(``--robot-actor``, :mod:`robofinetune.distributed.robot_actor`: a robot driven from its own computer, no
evaluation episodes; its operator's or scripted expert's takeovers run there, in the actor's loop) run as well.

Interventions (HIL-SERL; ``--intervener=scripted`` in sim, ``--teleop=keyboard|spacemouse|ros-topic`` on a
robot; :mod:`robofinetune.rl.interventions`). While someone else drives, the executed action a_h is theirs and the
policy's proposal is logged beside it (``policy_action``). Every replay row carries ``is_intervention``;
intervened rows go to the online buffer and are copied into the demo buffer (RLPD's symmetric sampling then
draws them as demos), each takeover its own n-step chain there. With ``--robot-actor`` the takeovers happen in
the robot actor's loop (the intervener or teleop source sits beside the robot, never waiting for this learner)
and its rows carry the flag and the executed action: they are stored, and the intervention counters and metrics
kept, as here (only the run's episodes dataset is not written: the actor sends rows, not observations). How the
learner uses them:

- critic: learns Q(x, a_h) from the executed action as it is, not clipped into the residual's reach
  [b - action_scale, b + action_scale]: a_h is what produced the next state and reward, so a clipped action
  would teach a transition that never happened. The critic takes full actions, so a_h is an ordinary input;
  its TD target bootstraps with the policy's own next action, b' + r'(x'), i.e. it learns the value of
  "take the operator's action now, then follow the policy", as for demo rows.
- actor: by default no extra term (``intervention_bc_weight = 0``), as HIL-SERL and RLPD: interventions shape
  the actor only through the critic, whose gradient dQ/da at b + r points toward the high values it learned
  at a_h. With ``intervention_bc_weight = w > 0`` the actor also regresses, on intervened rows, toward the
  residual that points at the operator: ``w * mean_batch( mask * ||(r - clip(a_h - b, +-action_scale)) /
  action_scale||^2 / A )``; clipped because the residual cannot express more, scaled so w weighs it against
  ``-mean Q`` (in [0, 1]).

Choices, and why:
- RL state (s, b), not an observation history: the base conditions on 2 frames and executes 4-action chunks,
  so s alone does not say what it will do next; b does. The residual only needs to know what it corrects,
  and the critic needs b to value one state under different base chunks (ResFiT does the same).
- Base state: reset for each env at its episode start, and at a time-limit cut the base action of the last
  state is asked of a copy of the base, so the n-step target bootstraps from the right (s, b).
- Demo transitions get b by running the base along each demo from its start, as in a rollout.
- Image bases (tasks with ``<camera>_image`` keys): s is not the flat observation but the frozen base's own
  ObservationEncoder features of the current frame (eval mode, no augmentation, no gradient;
  :mod:`robofinetune.rl.features`), computed once per transition and stored in replay as float32 (LeRobot and
  HIL-SERL freeze and share the encoder, LeRobot caches the frozen features); the ResFiT alternative, a
  critic-trained encoder with random shifts, would put two 84x84 convolution passes per sample into every
  update. Actor and critics never touch pixels; the exported policy encodes the image itself at act time
  (``ResidualPolicy.rl_observation``). Measured (2-core CPU, loaded, nice 19): can_image, 2 cameras 84x84,
  strided_conv: 137 features a frame, 1,202 bytes a transition (115 MiB at 100k, against 7.9 GiB for uint8
  images), the encoder pass ~16 ms per step for 2 envs (rendering is ~215 ms), a TD3 update ~36 ms vs ~32 ms on
  can's 23 flat state floats; pointmass_image: 68 features, 590 bytes a transition. ``train`` prints the figure
  and the summary keeps it (``replay_bytes_per_transition``). A checkpoint remembers the base's fingerprint:
  resuming with another base (whose actions and features differ from those in replay) is refused.
- Sizes for a shared 2-core CPU (``benchmarks/residual_throughput.py``): ResFiT's 10 heads of 2 x 1024 cost
  ~0.5 CPU-s per update here (~56 CPU-hours for 100k env steps at UTD 4); 10 heads of 2 x 128 keep the REDQ
  ensemble at ~20 CPU-ms per update. UTD 2 instead of 4, and the learner updates while the env processes
  simulate (``VectorRollout.step``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robofinetune.data.episode import Episode
from robofinetune.errors import CheckpointError, ConfigError
from robofinetune.images import is_image_key
from robofinetune.policies import load_policy, register_policy, save_policy
from robofinetune.policies.checkpoint import default_device
from robofinetune.policies.base import Policy
from robofinetune.rl.features import BASE_ENCODER, FrozenFeatures, observation_encoder_of, replay_row_bytes
from robofinetune.rl.learner import CheckpointedLearner
from robofinetune.rl.residual_acting import ResidualActing
from robofinetune.rl.setup import base_path, load_base_policy, load_demo_episodes
from robofinetune.rl import (CriticEnsemble, HeadGroups, ReplayBuffer, RunLoop, TransitionBatch, VectorRollout,
                             mlp, polyak_update, random_head_subset, sample_symmetric)
from robofinetune.runs import Run


@dataclass
class ResidualConfig:
    task: str = "can"
    base: str = ""                    # base policy folder; default policies/<task>/weak_diffusion
    dataset: str = ""                 # demos for the offline half; default datasets/<task>_scripted_200.hdf5
    num_demos: int = 0                # use the first N demos (0 = all)
    only_success_demos: bool = True
    seed: int = 0
    total_env_steps: int = 100_000
    num_envs: int = 2                 # env processes; the learner overlaps its updates with their stepping
    num_env_workers: int = 0          # > 0: the envs run in this many Ray actors (robofinetune/distributed); 0: local
    ray_address: str = ""             # with num_env_workers: "" starts a local Ray, "auto" / "ray://host:port" joins one
    # with num_env_workers: the Ray workers also run the policy (base + residual + exploration noise) and send
    # replay rows; the learner only learns (robofinetune/distributed/policy_workers.py)
    rollout_in_workers: bool = False
    weights_every: int = 10           # rollout_in_workers: the actor's weights go to the workers every this many updates
    worker_steps: int = 8             # rollout_in_workers: vector steps a worker runs per call (one batch to the learner)
    # a robot (or any task's env, paced at its control rate) driven by a named, detached Ray actor on the robot's
    # computer whose loop never waits for this learner (robofinetune/distributed/robot_actor.py); the learner drains
    # its rows and sends it weights every `weights_every` updates. No evaluation episodes run (summary.json says why)
    robot_actor: bool = False
    robot_actor_name: str = ""        # its Ray name; "" = residual-<task name>, saved in config.yaml for --resume
    robot_resource: str = ""          # a Ray custom resource the actor needs (e.g. "robot", the robot PC's); "" = any
    robot_control_rate: float = 0.0   # Hz; 0 = the robot YAML's control_rate (a simulated task: its control_freq)
    robot_actor_keep_running: bool = False   # at the end of the budget leave the actor acting (detach), not stop it
    # attach even while another learner holds the actor (one learner at a time; that learner's next drain is refused)
    robot_actor_takeover: bool = False
    # residual actor. ResFiT: action_scale 0.1, exploration std 0.05, zero-initialised last layer.
    action_scale: float = 0.1
    actor_hidden_dim: int = 256
    actor_depth: int = 2
    # Adam moves every weight by ~lr per step whatever the gradient's size, so with a 256-wide last layer the
    # pre-tanh output can move ~256 * lr per update: 1e-4 saturates a noisy residual within a few hundred
    # updates and wrecks a can policy; 1e-5 (ResFiT: 1e-6 on 1024-wide nets) lets the critic lead.
    actor_lr: float = 1e-5
    exploration_noise: float = 0.05
    # critic ensemble. ResFiT: 10 heads of 2 x 1024; on a shared 2-core CPU one such update takes ~0.5 s,
    # so 10 heads of 2 x 128 (~20 ms of CPU per update at batch 256): same ensemble and REDQ target.
    num_critics: int = 10
    critic_subset: int = 2            # REDQ: target = min over a random subset of this many heads
    critic_hidden_dim: int = 128
    critic_depth: int = 2
    critic_lr: float = 3e-4
    layer_norm: bool = True
    # TD learning
    gamma: float = 0.99
    n_step: int = 3
    tau: float = 0.005
    updates_per_step: float = 2.0     # critic updates per env step (UTD); ResFiT 4, halved for the CPU
    actor_update_every: int = 2       # TD3's delayed actor: one actor update per this many critic updates
    batch_size: int = 256
    target_noise: float = 0.05        # target-policy smoothing on the next residual, clipped
    target_noise_clip: float = 0.1
    clip_target: bool = True          # reward is 0/1 and success terminates, so Q lies in [0, 1]
    offline_fraction: float = 0.5     # RLPD symmetric sampling: demos / online
    buffer_capacity: int = 0          # online transitions kept (0 = total_env_steps, i.e. all)
    obs_std_floor: float = 0.01       # observation standardisation: std from the demos, floored
    # warm-up: base + uniform noise acts while only the critic learns
    warmup_steps: int = 5_000
    warmup_noise: float = 0.1
    # evaluation, logging, checkpoints
    eval_base: bool = True            # evaluate the frozen base first (the curve's first point; off when its card's
                                      # evaluation already holds that figure and the episodes cost minutes each)
    eval_every: int = 10_000
    eval_episodes: int = 50
    final_eval_episodes: int = 100
    eval_envs: int = 2
    eval_seed: int = 100_000
    checkpoint_every: int = 5_000     # also saves both replay buffers, so a crash loses at most this many steps
    log_every: int = 1_000
    # --gate: at each periodic evaluation and at the end, the policy becomes <run>/best only if the OPE gate
    # (FQE on gate_data, default the demos) promotes it over the current best, at first the frozen base
    gate: bool = False
    gate_data: str = ""
    gate_margin: float = 0.0
    gate_confidence: float = 0.95
    gate_iterations: int = 0          # FQE Bellman iterations (0: automatic, longest episode + 10)
    gate_steps_per_iteration: int = 50
    # human-in-the-loop interventions (module docstring; rl/interventions.py). Evaluations never intervene.
    intervener: str = "none"          # none | scripted: the task's scripted expert takes over when the policy stalls
    teleop: str = ""                  # a robot task (--task=real_robot/<robot>.yaml): keyboard | spacemouse | ros-topic
    stall_steps: int = 20             # scripted: no net motion of stall_distance over this many policy steps = stall
    stall_distance: float = 0.01      # metres (end effector / point mass)
    takeover_steps: int = 40          # scripted: the expert hands back after this many steps ...
    handback_on_subgoal: bool = True  # ... or when it finishes a phase of its plan (a sub-goal) ...
    min_takeover_steps: int = 10      # ... after driving at least this many steps
    intervener_noise: float = 0.0     # scripted: operator imperfection (envs.experts noise)
    intervention_bc_weight: float = 0.0   # actor BC toward the clipped operator residual on intervened rows (0: off)
    # the run's training episodes (executed and proposed actions, intervention flags) as a dataset in the run
    # folder: robomimic (episodes.hdf5) | lerobot (episodes_lerobot/) | none; "" = robomimic when intervening
    episodes_format: str = ""
    device: str = "auto"              # the learner's (actor and critics): auto = CUDA when present, else CPU
    torch_threads: int = 1            # torch's intra-op threads for the learner (see critic_threads)
    # threads that evaluate groups of critic heads at once (rl.critic.HeadGroups); 0 = automatic: the cores
    # the env processes leave free, up to 2 (1 on a 2-core machine). Same result whatever the count.
    critic_threads: int = 0
    progress: bool = True


# --- the composite policy: frozen base + residual actor ------------------------------------------------------

@dataclass
class ResidualPolicyConfig:
    task: str
    obs_keys: list[str]
    obs_shapes: dict[str, list[int]]
    action_dim: int
    action_scale: float = 0.1
    hidden_dim: int = 256
    depth: int = 2
    layer_norm: bool = True
    base_kind: str = ""
    n_obs_steps: int = 1              # the base's observation history, which act() takes (set from the base)
    # what the actor sees of the frame (robofinetune.rl.features): "state" = the flat observation keys;
    # "base_encoder" = the frozen base's own ObservationEncoder features (camera tasks: images never enter replay)
    features: str = "state"
    feature_dim: int = 0              # base_encoder: features per frame (set from the base's encoder)

    @property
    def obs_dim(self) -> int:
        """Size of the actor's observation part: encoder features, or the flat observation keys."""
        if self.features == BASE_ENCODER:
            return int(self.feature_dim)
        return int(sum(int(np.prod(self.obs_shapes[key])) for key in self.obs_keys))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResidualActor(nn.Module):
    """r = action_scale * tanh(MLP(standardised s, b)); the last layer starts at zero, so r = 0 at step 0 and
    training starts exactly from the base policy."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256, depth: int = 2, layer_norm: bool = True,
                 action_scale: float = 0.1) -> None:
        super().__init__()
        self.obs_dim, self.action_dim, self.action_scale = obs_dim, action_dim, action_scale
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.net = mlp(obs_dim + action_dim, action_dim, hidden_dim, depth, layer_norm)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def set_observation_statistics(self, observations: np.ndarray, std_floor: float) -> None:
        self.obs_mean.copy_(torch.as_tensor(observations.mean(axis=0), dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(np.maximum(observations.std(axis=0), std_floor), dtype=torch.float32))

    def normalize(self, rl_obs: torch.Tensor) -> torch.Tensor:
        """(s, b) -> (standardised s clipped to +-10, b); the critics see the same input."""
        obs, base_action = rl_obs[..., : self.obs_dim], rl_obs[..., self.obs_dim:]
        return torch.cat([((obs - self.obs_mean) / self.obs_std).clamp(-10.0, 10.0), base_action], dim=-1)

    def forward(self, rl_obs: torch.Tensor) -> torch.Tensor:
        return self.action_scale * torch.tanh(self.net(self.normalize(rl_obs)))


def compose(base_action: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return (base_action + residual).clamp(-1.0, 1.0)


class ResidualPolicy(Policy):
    """Frozen base policy + residual actor, a policy like any other: ``select_action`` per env step, ``reset``
    per env. Saved with the base checkpoint inside its folder (``base/``)."""

    kind = "residual"
    config: ResidualPolicyConfig

    def __init__(self, config: ResidualPolicyConfig, base: Policy | None = None) -> None:
        super().__init__()
        if base is None:
            raise CheckpointError("a residual policy needs its base policy (load it with load_policy)")
        config.n_obs_steps = int(getattr(base.config, "n_obs_steps", 1))
        encoder = observation_encoder_of(base) if config.features == BASE_ENCODER else None
        # a plain attribute, not a submodule: the encoder's weights are the base's and are saved with it once
        self.features = FrozenFeatures(config.features, config.obs_keys, encoder)
        if encoder is not None:
            config.feature_dim = int(encoder.output_dim)
        self.config = config
        self.base = base
        self.base.requires_grad_(False)
        self.actor = ResidualActor(config.obs_dim, config.action_dim, config.hidden_dim, config.depth,
                                   config.layer_norm, config.action_scale)

    def rl_observation(self, obs: dict[str, np.ndarray], base_action: np.ndarray) -> torch.Tensor:
        """(features of the current frame, base action) as the actor takes it; images are encoded here, so the
        policy acts from raw observations."""
        flat = self.features(obs)
        # the actor's device: a learner on CUDA trains the actor there while the base samples on the CPU
        return torch.as_tensor(np.concatenate([flat, base_action], axis=1), device=self.actor.obs_mean.device)

    @torch.no_grad()
    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        base_action = np.asarray(self.base.select_action(obs), np.float32)
        rl_obs = self.rl_observation(obs, base_action)
        action = compose(rl_obs[:, -self.config.action_dim:], self.actor(rl_obs))
        return action.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The residual corrects one step at a time, so the chunk is one action: the base's first action for
        this observation history, corrected (B, 1, A). Stateless; ``select_action`` is the way to drive envs."""
        base_action = np.asarray(self.base.act(obs)[:, 0], np.float32)
        current = {key: np.asarray(obs[key])[:, -1] for key in self.config.obs_keys}
        rl_obs = self.rl_observation(current, base_action)
        return compose(rl_obs[:, -self.config.action_dim:], self.actor(rl_obs)).cpu().numpy()[:, None]

    def reset(self, env_index: int | None = None) -> None:
        self.base.reset(env_index)

    def seed_sampling(self, seed: int | None) -> None:
        self.base.seed_sampling(seed)  # the residual itself is deterministic

    def save_extra(self, folder: Path) -> None:
        save_policy(self.base, Path(folder) / "base", getattr(self.base, "checkpoint_metadata", {}))

    @classmethod
    def load_extra(cls, folder: Path, config: ResidualPolicyConfig) -> "ResidualPolicy":
        return cls(config, base=load_policy(Path(folder) / "base", device="cpu"))


register_policy("residual", ResidualPolicy, ResidualPolicyConfig)


# --- learner state and the update step -----------------------------------------------------------------------

class ResidualLearner(CheckpointedLearner):
    """Actor, critic ensemble, their targets and optimisers."""

    optimizers = ("actor_optimizer", "critic_optimizer")
    counters = ("critic_updates", "actor_updates")

    def __init__(self, config: ResidualConfig, actor: ResidualActor) -> None:
        super().__init__()
        self.config = config
        self.actor = actor
        rl_obs_dim = actor.obs_dim + actor.action_dim
        device = actor.obs_mean.device   # the learner lives where the actor was put (config field 'device')
        self.critic = CriticEnsemble(rl_obs_dim, actor.action_dim, config.num_critics, config.critic_hidden_dim,
                                     config.critic_depth, config.layer_norm).to(device)
        self.actor_target = copy.deepcopy(actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # fused Adam: one kernel over all of a network's tensors instead of a loop of small ops, ~7x cheaper for
        # this critic on a CPU core (same update up to float rounding)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=True)
        self.generator = torch.Generator().manual_seed(config.seed)   # CPU: the same draws on any device
        self.head_groups = HeadGroups(config.num_critics, resolve_critic_threads(config.critic_threads, device,
                                                                              config.num_envs))
        self.critic_updates = 0
        self.actor_updates = 0


def resolve_critic_threads(requested: int, device: torch.device | str = "cpu", num_envs: int = 0) -> int:
    """``critic_threads`` with 0 meaning automatic: on a CPU, one thread per core the env processes leave free,
    at most 2 (on the 2-core machine with 2 env processes that is 1: a second thread competing with the env
    processes made `train residual` slower there, 12.1 vs 13.4 env steps/s, benchmarks/residual_throughput.py);
    on a GPU one (its kernels already run the heads in parallel)."""
    import os

    if requested > 0:
        return requested
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(2, (os.cpu_count() or 1) - num_envs))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else as torch reads it."""
    if name == "auto":
        return default_device()
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"config field 'device' is {name!r}: {error}") from error


def check_rollout_in_workers(config: ResidualConfig) -> None:
    """ConfigError for what the policy workers do not carry: they need Ray env workers, and neither the
    interventions (a scripted intervener or a teleop operator sit beside the env) nor the training-episode
    dataset (it needs the raw observations, which workers do not send) run in them yet."""
    if config.num_env_workers < 1:
        raise ConfigError("config field 'rollout_in_workers' needs Ray env workers: set 'num_env_workers' >= 1")
    if config.intervener != "none" or config.teleop:
        raise ConfigError("config field 'rollout_in_workers' cannot be combined with 'intervener' or 'teleop' yet: "
                          "run interventions with rollout_in_workers=false")
    if config.episodes_format not in ("", "none"):
        raise ConfigError(f"config field 'rollout_in_workers' cannot be combined with episodes_format="
                          f"{config.episodes_format!r} yet (the workers send replay rows, not observations): "
                          f"use episodes_format=none")
    if config.weights_every < 1 or config.worker_steps < 1:
        raise ConfigError(f"config fields 'weights_every' and 'worker_steps' must be >= 1, got "
                          f"{config.weights_every} and {config.worker_steps}")


def check_robot_actor(config: ResidualConfig) -> None:
    """ConfigError for what ``robot_actor`` cannot be combined with: the actor is the only thing that steps an env
    (no learner-side envs or workers beside it; an intervener or teleop operator goes into the actor), and it
    drives one robot."""
    if config.rollout_in_workers or config.num_env_workers > 0:
        raise ConfigError("config field 'robot_actor' cannot be combined with 'rollout_in_workers' or "
                          "'num_env_workers' > 0: the robot actor is the only env of the run")
    if config.num_envs != 1:
        raise ConfigError(f"config field 'robot_actor' drives one robot: set 'num_envs' to 1, got {config.num_envs}")
    if config.episodes_format not in ("", "none"):
        raise ConfigError(f"config field 'robot_actor' cannot be combined with episodes_format="
                          f"{config.episodes_format!r} (the actor sends replay rows, not observations): "
                          f"use episodes_format=none")
    if config.weights_every < 1 or config.robot_control_rate < 0:
        raise ConfigError(f"config fields 'weights_every' must be >= 1 and 'robot_control_rate' >= 0, got "
                          f"{config.weights_every} and {config.robot_control_rate}")


def robot_actor_name(config: ResidualConfig) -> str:
    """The robot actor's Ray name: ``robot_actor_name``, else ``residual-<task name>`` (a robot YAML's stem). Named
    after the robot, not the run: a second run on the same robot finds the actor that drives it instead of
    opening a second connection to the robot."""
    return config.robot_actor_name or f"residual-{Path(config.task).stem}"


def td3_update(learner: ResidualLearner, batch: TransitionBatch, update_actor: bool) -> dict[str, float]:
    """One critic update (and, if ``update_actor``, one actor update) on a batch of n-step transitions whose
    observations are RL states (s, b) and whose actions are the executed ones. The ensemble's heads are
    evaluated in ``learner.head_groups`` (one thread per group of heads; one group = plain sequential code)."""
    config, actor, critic = learner.config, learner.actor, learner.critic
    action_dim = actor.action_dim
    obs, next_obs = actor.normalize(batch.obs), actor.normalize(batch.next_obs)
    with torch.no_grad():
        # target-policy smoothing on the residual; the base action of the next state is part of that state
        noise = (torch.randn(batch.action.shape, generator=learner.generator) * config.target_noise).clamp(
            -config.target_noise_clip, config.target_noise_clip).to(batch.action.device)
        next_action = compose(batch.next_obs[:, -action_dim:], learner.actor_target(batch.next_obs) + noise)
        # REDQ: min over a random subset of the target heads, and only those heads are evaluated
        subset = random_head_subset(config.num_critics, config.critic_subset, learner.generator)
        next_q = learner.critic_target(next_obs, next_action, heads=subset).min(dim=0).values
        target = batch.reward + batch.discount * next_q
        if config.clip_target:
            target = target.clamp(0.0, 1.0)

    def critic_loss_backward(heads: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        q = critic(obs, batch.action, heads=heads)                  # (heads in the group, B)
        loss = (q - target).pow(2).mean(dim=1).sum()                 # the heads' losses add up
        loss.backward()
        return loss.detach(), q.detach().sum(dim=0)

    learner.critic_optimizer.zero_grad(set_to_none=True)
    losses, q_sums = zip(*learner.head_groups.map(critic_loss_backward))
    learner.critic_optimizer.step()
    learner.critic_updates += 1
    heads_times_batch = config.num_critics * target.shape[0]
    stats = {"critic_loss": sum(losses).item() / config.num_critics, "q": sum(q_sums).sum().item() / heads_times_batch,
             "target": target.mean().item()}
    if update_actor:
        # maximise mean over heads of Q(x, b + r(x)); dQ/d(action) comes from each group of heads, the actor's
        # backward runs once on their sum. The critic's weights get no gradient here.
        residual = actor(batch.obs)
        action = compose(batch.obs[:, -action_dim:], residual)
        action_leaf = action.detach().requires_grad_(True)

        def q_action_gradient(heads: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.enable_grad():
                q_sum = critic(obs, action_leaf, heads=heads).sum()
                (gradient,) = torch.autograd.grad(q_sum, action_leaf)
            return gradient, q_sum.detach()

        critic.requires_grad_(False)
        gradients, q_totals = zip(*learner.head_groups.map(q_action_gradient))
        critic.requires_grad_(True)
        actor_loss = -sum(q_totals) / heads_times_batch
        learner.actor_optimizer.zero_grad(set_to_none=True)
        # d(actor_loss)/d(action) enters as a linear surrogate, so the BC term can join the same backward pass
        surrogate = (action * (-sum(gradients) / heads_times_batch)).sum()
        if config.intervention_bc_weight > 0 and batch.is_intervention is not None:
            bc_loss = intervention_bc_loss(residual, batch.obs[:, -action_dim:], batch.action, batch.is_intervention,
                                           actor.action_scale)
            surrogate = surrogate + config.intervention_bc_weight * bc_loss
            stats["intervention_bc_loss"] = bc_loss.item()
        surrogate.backward()
        learner.actor_optimizer.step()
        learner.actor_updates += 1
        polyak_update(learner.actor_target, actor, config.tau)
        stats.update(actor_loss=actor_loss.item(), residual=residual.abs().mean().item())
    polyak_update(learner.critic_target, learner.critic, config.tau)
    return stats


def intervention_bc_loss(residual: torch.Tensor, base_action: torch.Tensor, executed: torch.Tensor,
                         is_intervention: torch.Tensor, action_scale: float) -> torch.Tensor:
    """mean over the batch of mask * ||(r - clip(a_h - b, +-scale)) / scale||^2 / A: the residual pulled toward the
    operator's action as far as it can reach, on intervened rows only (others add 0)."""
    target = (executed - base_action).clamp(-action_scale, action_scale)
    per_row = ((residual - target) / action_scale).pow(2).mean(dim=1)
    return (per_row * is_intervention.to(per_row.dtype)).mean()


# --- data --------------------------------------------------------------------------------------------------

def load_base(config: ResidualConfig) -> Policy:
    """The frozen base: any policy the toolkit loads (diffusion, flow, a distilled student)."""
    base = load_base_policy(config.base, config.task)
    base.requires_grad_(False)
    return base.eval()


def load_demos(config: ResidualConfig, obs_keys: list[str]) -> tuple[Path, list[Episode]]:
    return load_demo_episodes(config.task, config.dataset, obs_keys, config.num_demos, config.only_success_demos)


@torch.no_grad()
def label_base_actions(base: Policy, episodes: list[Episode], obs_keys: list[str], batch: int = 64,
                       progress: bool | None = None) -> list[np.ndarray]:
    """What the base would propose in every state of every demo, (T + 1, A) per episode (row T: the final
    observation), by running it along each demo from the episode start, chunk queue included, as in a rollout.

    ``progress``: a bar over the demo steps (a minute for 200 can demos); None shows it on a terminal only."""
    from tqdm.auto import tqdm

    labels = []
    groups = range(0, len(episodes), batch)
    total = sum(max(len(episode) for episode in episodes[start: start + batch]) + 1 for start in groups)
    bar = tqdm(total=total, desc="label demos with the base", unit="step", leave=None,
               disable=None if progress is None else not progress)
    for start in groups:
        group = episodes[start: start + batch]
        base.reset()
        steps = max(len(episode) for episode in group) + 1
        out = [np.zeros((len(episode) + 1, base.config.action_dim), np.float32) for episode in group]
        states = []
        for episode in group:
            final = episode.final_observation or {key: episode.observations[key][-1] for key in obs_keys}
            states.append({key: np.concatenate([episode.observations[key], np.asarray(final[key])[None]])
                           for key in obs_keys})
        for t in range(steps):
            # state keys as float32; camera keys stay uint8, as the base's encoder takes them
            obs = {key: np.stack([state[key][min(t, len(state[key]) - 1)] for state in states]).astype(
                       np.uint8 if is_image_key(key) else np.float32) for key in obs_keys}
            actions = base.select_action(obs)
            for row, episode in enumerate(group):
                if t <= len(episode):
                    out[row][t] = actions[row]
            bar.update(1)
        labels.extend(out)
        base.reset()
    bar.close()
    return labels


# --- training ------------------------------------------------------------------------------------------------

#: Seconds the learner waits before asking the robot actor again when it had no rows.
ROBOT_DRAIN_PAUSE_S = 0.02
#: Why a robot_actor run has no evaluations (summary.json's "evaluations").
ROBOT_ACTOR_NO_EVALUATION = ("not run: with robot_actor the task's env is the robot the actor drives, and evaluation "
                             "episodes would open a second connection to it; evaluate the policy with "
                             "`robofinetune deploy`. train/episode_success is the actor's own training episodes, "
                             "exploration noise included")


class TrainingEpisodeSuccess:
    """The robot actor's training episodes since the last report: what a ``robot_actor`` run logs as
    ``train/episode_success`` (every ``eval_every`` env steps and at the end) where other runs evaluate. Not kept
    in checkpoints: after a resume the first window starts at the resume."""

    def __init__(self) -> None:
        self.since, self.episodes, self.successes = 0, 0, 0
        self.last: dict[str, Any] = {"env_steps_from": 0, "env_steps": 0, "episodes": 0, "success": None}

    def start(self, env_steps: int) -> None:
        self.since, self.episodes, self.successes = env_steps, 0, 0

    def record(self, outcomes: list[Any]) -> None:
        for outcome in outcomes:
            if not getattr(outcome, "aborted", False):
                self.episodes += 1
                self.successes += int(outcome.success)

    def log(self, run: Run, env_steps: int) -> None:
        """Log the window's success rate (when an episode ended in it) and start the next window."""
        success = self.successes / self.episodes if self.episodes else None
        if success is not None:
            run.log(env_steps, **{"train/episode_success": success, "train/episode_success_episodes": self.episodes})
        self.last = {"env_steps_from": self.since, "env_steps": env_steps, "episodes": self.episodes,
                     "success": success}
        self.start(env_steps)


def connect_robot_actor(config: ResidualConfig, actor_kwargs: dict[str, Any], feature_kind: str,
                        env_steps: int, scripted: Any = None) -> Any:
    """A :class:`~robofinetune.distributed.robot_actor.RobotActorLink` to the robot actor named for this run: the
    running one (a resumed learner; the robot kept acting meanwhile), else a new one acting as the in-process
    loop would (same base, actor, features, noise and seed; the warm-up left after ``env_steps``; the same
    intervener, with ``scripted`` its ScriptedInterventionConfig, or teleop operator)."""
    from robofinetune.distributed.robot_actor import RobotActorError, RobotActorLink, RobotActorSpec, running_spec

    name, address = robot_actor_name(config), config.ray_address or None
    spec = RobotActorSpec(task=config.task, base=str(base_path(config.base, config.task)), actor_kwargs=actor_kwargs,
                          feature_kind=feature_kind, control_rate=config.robot_control_rate or None,
                          exploration_noise=config.exploration_noise, warmup_noise=config.warmup_noise,
                          warmup_steps=max(0, config.warmup_steps - env_steps), seed=config.seed,
                          teleop=config.teleop, intervener=config.intervener,
                          scripted=asdict(scripted) if scripted is not None and config.intervener == "scripted" else {})
    running = running_spec(name, ray_address=address)
    if running is not None:
        # checked before attaching, which would take the actor's weights over from whichever learner has it
        different = spec.policy_differences(running)
        if different:
            raise RobotActorError(f"the robot actor {name!r} runs another policy or intervener than this run "
                                  f"({different} differ): stop it, or name another actor (config field "
                                  f"'robot_actor_name')")
        # a learner that died without letting go (kill -9, a lost machine) holds the actor until its lease runs out:
        # a resume right after it waits that out instead of failing (a live holder still refuses, after the wait)
        lease_s = running.learner_lease_s
        print(f"attaching to the running robot actor {name!r} (waiting up to {lease_s + 5:g} s if another learner "
              f"still holds it)", flush=True)
        link = RobotActorLink.attach(name, weights_every=config.weights_every, ray_address=address,
                                     takeover=config.robot_actor_takeover, wait_s=lease_s + 5.0)
        stats = link.stats()
        if stats.stop_requested:   # its loop ended for good: there is nothing to learn from
            link.detach()
            raise RobotActorError(f"the robot actor {name!r} was stopped by its operator at the robot (its loop has "
                                  f"ended): stop the actor (robofinetune robot-actor stop --name={name}) and run "
                                  f"again to start a new one")
        print(f"attached to the running robot actor {name!r} ({stats.steps} steps so far)", flush=True)
        return link
    if not address:
        print("robot actor in a local Ray that ends with this process: join a cluster (--ray-address=auto) for an "
              "actor that outlives the learner", flush=True)
    resources = {config.robot_resource: 1.0} if config.robot_resource else None
    link = RobotActorLink.start(spec, name=name, resources=resources, weights_every=config.weights_every,
                                ray_address=address)
    print(f"started the robot actor {name!r} at {link.stats().target_rate_hz:g} Hz", flush=True)
    return link


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def train(config: ResidualConfig, run: Run, resume: bool = False) -> dict[str, Any]:
    """Learn the residual; write ``<run>/policy`` (base + residual), checkpoints, metrics, the success curve
    and ``eval.json``; return a summary with base and final success."""
    from robofinetune.envs import load_task_spec

    if config.num_envs < 1 or config.total_env_steps < 1:
        raise ConfigError("config fields 'num_envs' and 'total_env_steps' must be >= 1")
    if config.robot_actor:
        check_robot_actor(config)          # before the minutes of demo labelling
    elif config.rollout_in_workers:
        check_rollout_in_workers(config)   # before the minutes of demo labelling and the base's evaluation
    torch.set_num_threads(max(1, config.torch_threads))
    _seed_everything(config.seed)
    spec = load_task_spec(config.task)
    obs_keys = list(spec.obs_keys)
    base = load_base(config)
    if list(base.config.obs_keys) != obs_keys and not set(base.config.obs_keys) <= set(obs_keys):
        raise CheckpointError(f"base policy observes {base.config.obs_keys}; task '{config.task}' gives {obs_keys}")
    action_dim = spec.action_dim
    # a base with an image encoder: the actor and critics see its frozen features (module docstring)
    feature_kind = BASE_ENCODER if observation_encoder_of(base) is not None else "state"
    policy_config = ResidualPolicyConfig(task=config.task, obs_keys=obs_keys,
                                         obs_shapes={key: list(shape) for key, shape in spec.obs_shapes.items()},
                                         action_dim=action_dim, action_scale=config.action_scale,
                                         hidden_dim=config.actor_hidden_dim, depth=config.actor_depth,
                                         layer_norm=config.layer_norm, base_kind=getattr(base, "kind", ""),
                                         features=feature_kind)
    # The evaluated policy owns a copy of the base: evaluation resets base state that training rollouts need.
    policy = ResidualPolicy(policy_config, base=copy.deepcopy(base))
    device = resolve_device(config.device)
    policy.actor.to(device)   # the base stays on the CPU: it samples one chunk for two envs every 4 steps
    learner = ResidualLearner(config, policy.actor)
    # replay rows are computed with the training base's encoder (the same weights as the policy's copy)
    features = FrozenFeatures(feature_kind, obs_keys, observation_encoder_of(base))
    feature_dim = policy_config.obs_dim
    rl_obs_dim = feature_dim + action_dim
    row_bytes = replay_row_bytes(feature_dim, action_dim)
    print(f"replay: {feature_kind} features, {feature_dim} floats a frame, {row_bytes} bytes a transition "
          f"({row_bytes * 100_000 / 2**20:.0f} MiB at 100k)", flush=True)

    dataset_path, demos = load_demos(config, obs_keys)
    intervening = config.intervener != "none" or bool(config.teleop)
    online_capacity = config.buffer_capacity or config.total_env_steps
    # intervened transitions are copied into the demo buffer too: room for as many as the online buffer holds
    offline = ReplayBuffer(rl_obs_dim, action_dim, capacity=sum(len(e) for e in demos) + intervening * online_capacity,
                           seed=config.seed)
    online = ReplayBuffer(rl_obs_dim, action_dim, capacity=online_capacity, seed=config.seed + 1)
    loop = RunLoop(run, config.total_env_steps, config.task, eval_every=config.eval_every,
                   eval_episodes=config.eval_episodes, eval_envs=config.eval_envs, eval_seed=config.eval_seed,
                   checkpoint_every=config.checkpoint_every, progress=config.progress,
                   description=f"residual {config.task}")
    noise_rng = np.random.default_rng(config.seed)
    from robofinetune.algos.ope import policy_fingerprint   # here, not at import: keeps scipy out of `--help`

    base_fingerprint = policy_fingerprint(base_path(config.base, config.task))
    state = loop.load_checkpoint({"offline": offline, "online": online}) if resume else None
    if resume and state is None:
        print(f"{run.path}: no checkpoint yet, starting from the beginning")
    if state is not None:
        saved_fingerprint = state.get("base_fingerprint")   # absent in checkpoints from before it was kept
        if saved_fingerprint is not None and saved_fingerprint != base_fingerprint:
            raise CheckpointError(f"{run.path}: its checkpoint was made with another base policy than "
                                  f"{base_path(config.base, config.task)} (config field 'base'); its replay holds "
                                  f"that base's actions and features, so it cannot resume with this one")
        learner.load_learner_state(state["learner"])
        torch.set_rng_state(state["torch_rng"])
        noise_rng.bit_generator.state = state["noise_rng"]
        online.end_streams()  # envs restart, episodes in flight at the checkpoint are over
        offline.end_streams()  # ... and so are takeovers in flight
        print(f"resumed at {loop.env_steps} env steps ({len(online)} online transitions)")
    else:
        base.seed_sampling(config.seed)
        labels = label_base_actions(base, demos, obs_keys, progress=config.progress)
        for episode, label in zip(demos, labels):
            states = None
            if feature_kind == BASE_ENCODER:
                states = features.of_episode(episode.observations, episode.final_observation)
            offline.add_episode(episode, obs_keys, extra=label, states=states)
        policy.actor.set_observation_statistics(offline.obs[: len(offline), : feature_dim], config.obs_std_floor)
        learner.actor_target.load_state_dict(policy.actor.state_dict())
        # evaluation episodes would open a second connection to the robot actor's robot
        if config.eval_base and not config.robot_actor:
            # zero-initialised residual: this *is* the base policy's success rate
            loop.evaluate(policy, episodes=config.final_eval_episodes, label="base")

    metadata = {"task": config.task, "base": str(base_path(config.base, config.task)),
                "dataset": str(dataset_path), "run": str(run.path),
                "made_by": f"robofinetune train residual --task={config.task}"}

    def save_checkpoint() -> None:
        loop.save_checkpoint({"learner": learner.learner_state(), "torch_rng": torch.get_rng_state(),
                              "noise_rng": noise_rng.bit_generator.state, "base_fingerprint": base_fingerprint},
                             {"offline": offline, "online": online})
        save_policy(policy, run.path / "policy", {**metadata, "env_steps": loop.env_steps})

    from robofinetune.algos.ope import training_gate   # here, not at import: keeps scipy out of `--help` and tests

    gate = training_gate(config, run, metadata["base"], dataset_path, obs_keys)

    from robofinetune.rl.interventions import ScriptedInterventionConfig, make_training_envs
    from robofinetune.rl.training_episodes import episodes_path, open_training_episodes

    scripted = ScriptedInterventionConfig(stall_steps=config.stall_steps, stall_distance=config.stall_distance,
                                          takeover_steps=config.takeover_steps,
                                          handback_on_subgoal=config.handback_on_subgoal,
                                          min_takeover_steps=config.min_takeover_steps,
                                          expert_noise=config.intervener_noise)
    ray_rollout, robot_link = None, None
    actor_kwargs = {"obs_dim": policy.actor.obs_dim, "action_dim": action_dim, "hidden_dim": config.actor_hidden_dim,
                    "depth": config.actor_depth, "layer_norm": config.layer_norm, "action_scale": config.action_scale}
    if config.robot_actor:
        if not config.robot_actor_name:   # kept in config.yaml: a --resume reattaches to this name
            config.robot_actor_name = robot_actor_name(config)
            run.save_config(config)
        robot_link = connect_robot_actor(config, actor_kwargs, feature_kind, loop.env_steps, scripted)
        envs, operator = None, None
    elif config.rollout_in_workers:
        from robofinetune.distributed.policy_workers import RayPolicyRollout

        ray_rollout = RayPolicyRollout(config.task, config.num_envs, config.num_env_workers,
                                       200_000 + 1_000 * config.seed, base_path(config.base, config.task), actor_kwargs,
                                       feature_kind, config.exploration_noise, config.warmup_noise,
                                       config.warmup_steps, config.seed, steps_per_call=config.worker_steps,
                                       weights_every=config.weights_every, ray_address=config.ray_address or None)
        envs, operator = None, None
    elif config.num_env_workers > 0:
        from robofinetune.distributed.ray_envs import make_training_ray_envs

        envs, operator = make_training_ray_envs(config.task, config.num_envs, 200_000 + 1_000 * config.seed,
                                                config.num_env_workers, config.ray_address, config.intervener,
                                                config.teleop), None
    else:
        envs, operator = make_training_envs(config.task, config.num_envs, 200_000 + 1_000 * config.seed,
                                            config.intervener, config.teleop, scripted)
    rollout = VectorRollout(envs) if envs is not None else None
    acting = ResidualActing(rollout, base, policy.actor, features, noise_rng, config.exploration_noise,
                            config.warmup_noise) if rollout is not None else None
    # the robot actor sends replay rows, not observations: no episodes dataset from it (check_robot_actor)
    episodes_format = config.episodes_format or ("robomimic" if intervening and not config.robot_actor else "none")
    episodes = None
    if episodes_format != "none":
        robot = getattr(envs.envs[0].unwrapped, "config", None) if operator is not None else None
        env_meta = robot.env_meta if robot is not None else {"env_name": spec.name, "task": spec.name, "env_kwargs": {}}
        episodes = open_training_episodes(run.path, episodes_format, config.num_envs, obs_keys,
                                          {**env_meta, "source": "train residual", "run": str(run.path)},
                                          spec.control_freq, resume=resume,
                                          metadata={"source": "train residual", "intervener": config.teleop or config.intervener})
    # no success signal from the robot: the operator marks each episode, which is stored only once marked
    marking = operator is not None and getattr(envs.envs[0].unwrapped.config, "success", None) is None
    pending: list[tuple[np.ndarray, ...]] = []
    takeover_streams = 1_000_000 + np.arange(config.num_envs)   # demo-buffer chains of the envs' takeovers

    def store(rl_obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_rl_obs: np.ndarray,
              terminated: np.ndarray, truncated: np.ndarray, intervened: np.ndarray,
              env_index: np.ndarray | None = None) -> None:
        """Online buffer: every transition. Demo buffer: the intervened ones, each takeover its own chain.
        ``env_index``: the env of each row (default: row i is env i)."""
        env_index = np.arange(len(reward)) if env_index is None else np.asarray(env_index)
        online.add_transitions(rl_obs, action, reward, next_rl_obs, terminated, truncated, env_index, intervened)
        for index in env_index[~intervened]:
            offline.end_stream(int(takeover_streams[index]))   # a handback ends the takeover's chain
        rows = np.flatnonzero(intervened)
        if len(rows):
            offline.add_transitions(rl_obs[rows], action[rows], reward[rows], next_rl_obs[rows], terminated[rows],
                                    truncated[rows], takeover_streams[env_index[rows]], np.ones(len(rows), bool))

    stats_sum: dict[str, float] = {}
    stats_count = 0
    update_debt = 0.0
    timing = {"update_seconds": 0.0, "updates": 0}

    def run_updates(count: int, train_actor: bool) -> None:
        nonlocal stats_count
        start = time.perf_counter()
        for _ in range(count):
            batch = sample_symmetric(offline, online, config.batch_size, config.n_step, config.gamma,
                                     config.offline_fraction).to_torch(device)
            update_actor = train_actor and (learner.critic_updates + 1) % config.actor_update_every == 0
            for key, value in td3_update(learner, batch, update_actor).items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value
            stats_count += 1
            if ray_rollout is not None or robot_link is not None:   # every `weights_every` updates the actors get it
                (ray_rollout or robot_link).publish(learner.critic_updates, policy.actor)
        timing["update_seconds"] += time.perf_counter() - start
        timing["updates"] += count

    from robofinetune.distributed.weights import StalenessLog

    staleness_window, staleness_total = StalenessLog(), StalenessLog()
    robot_episodes = TrainingEpisodeSuccess()
    window = {"start": time.time(), "steps": 0}

    def stopped_by_operator() -> bool:
        """The operator's stop key: at this process's terminal, or at the robot the robot actor drives (whose
        every row is stored by then)."""
        return ((operator is not None and operator.stop_requested)
                or (robot_link is not None and robot_link.stop_requested))

    def end_of_step(env_steps: int, finished: list) -> bool:
        """Count the step's env steps and episodes; log, evaluate and checkpoint when due. True: stop now."""
        nonlocal stats_count
        loop.record(env_steps, finished)
        window["steps"] += env_steps
        if stats_count:
            loop.show(q=stats_sum["q"] / stats_count, closs=stats_sum["critic_loss"] / stats_count)
        if loop.due(config.log_every) and stats_count:
            elapsed = max(time.time() - window["start"], 1e-9)
            metrics = {f"train/{key}": value / stats_count for key, value in stats_sum.items()}
            if intervening:
                metrics.update({"train/intervention_rate": loop.intervention_rate,
                                "train/interventions_per_episode": loop.interventions_per_episode,
                                "train/intervened_steps": loop.intervened_steps})
            if ray_rollout is not None or robot_link is not None:
                recent = staleness_window.summary(reset=True)
                metrics.update({"train/staleness_mean": recent["staleness_mean"],
                                "train/staleness_max": recent["staleness_max"]})
            if ray_rollout is not None:
                metrics["train/worker_restarts"] = ray_rollout.restarts
            if robot_link is not None:
                actor_stats = robot_link.stats()
                metrics.update({"robot/achieved_rate_hz": actor_stats.achieved_rate_hz,
                                "robot/rows_dropped": actor_stats.rows_dropped,
                                "robot/weights_version": actor_stats.weights_version})
            metrics.update({"train/success_recent": loop.recent_success_rate if loop.recent_success else 0.0,
                            "train/episodes": loop.episodes, "perf/env_steps_per_s": window["steps"] / elapsed,
                            "perf/updates_per_s": timing["updates"] / max(timing["update_seconds"], 1e-9),
                            "train/critic_updates": learner.critic_updates})
            run.log(loop.env_steps, **metrics)
            stats_sum.clear()
            stats_count = 0
            window["start"], window["steps"] = time.time(), 0
        if robot_link is not None:
            robot_episodes.record(finished)
        if loop.due(config.eval_every) and not loop.finished:
            if robot_link is None:
                loop.evaluate(policy)
            else:   # no evaluation episodes on the robot the actor drives: its own training episodes instead
                robot_episodes.log(run, loop.env_steps)
            if gate is not None:   # the gate is off-policy evaluation on logged data: no episodes, it runs here too
                gate.consider(policy, loop.env_steps, metadata)
        stop = stopped_by_operator()
        if loop.due(config.checkpoint_every) or loop.finished or stop:
            save_checkpoint()
        loop.end_step()
        if stop:
            print(f"stopped by the operator at {loop.env_steps} env steps")
        return stop

    def learn_from(delivered: Any) -> bool:
        """Store a batch of replay rows that Ray actors collected (policy workers' RolloutBatch, the robot actor's
        RobotBatch), do its updates (``updates_per_step`` per row) and count its rows as env steps. True: stop now."""
        nonlocal update_debt
        for index in delivered.dropped_envs:   # a worker crashed, or the robot's rows do not follow the last ones
            online.end_stream(int(index))
            offline.end_stream(int(takeover_streams[index]))
        if delivered.rows is None:
            return False
        store(*delivered.rows, env_index=delivered.env_index)
        versions = delivered.version
        if robot_link is not None:
            # The robot actor outlives its learners: after this learner resumed from a checkpoint older than the
            # weights a crashed learner last published, the actor keeps acting (and tagging rows) with that newer
            # version until this learner catches up, and StalenessLog refuses negative staleness. Those rows are
            # fresh as far as anything here knows: count them as 0 updates stale.
            versions = np.minimum(versions, learner.critic_updates)
        staleness_window.record(versions, learner.critic_updates)
        staleness_total.record(versions, learner.critic_updates)
        warming_up = loop.env_steps < config.warmup_steps
        update_debt += config.updates_per_step * delivered.env_steps
        updates_now = int(update_debt)
        update_debt -= updates_now
        run_updates(updates_now, not warming_up)
        return end_of_step(delivered.env_steps, delivered.finished)

    finished_normally = False
    try:
        if robot_link is not None:
            loop.start()
            # this learner's weights from now on (a reattached actor acted with a dead learner's until here)
            robot_link.publish(learner.critic_updates, policy.actor, force=True)
            window["start"] = time.time()
            robot_episodes.start(loop.env_steps)
            while not loop.finished:
                # the robot actor acts at its own pace; this process stores its rows and learns. Never more rows
                # than the budget has left: env steps counted are rows stored
                delivered = robot_link.drain(config.total_env_steps - loop.env_steps)
                if delivered is None and robot_link.stop_requested:
                    end_of_step(0, [])   # the operator's stop at the robot: checkpoint and end as in-process
                    break
                if delivered is None:
                    time.sleep(ROBOT_DRAIN_PAUSE_S)
                    continue
                if learn_from(delivered):
                    break
        elif ray_rollout is not None:
            loop.start()
            ray_rollout.start(loop.env_steps, config.total_env_steps, learner.critic_updates, policy.actor)
            window["start"] = time.time()
            while not loop.finished:
                # the workers act; this process stores what they send and learns, updates_per_step per row
                delivered = ray_rollout.next_batch()
                if delivered is None:
                    break
                if learn_from(delivered):
                    break
        else:
            acting.start(reset_seed=200_000 + 1_000 * config.seed + loop.env_steps,
                         sampling_seed=200_000 + 1_000 * config.seed + loop.env_steps)
            loop.start()
            window["start"] = time.time()
            while not loop.finished:
                warming_up = loop.env_steps < config.warmup_steps
                update_debt += config.updates_per_step * config.num_envs
                updates_now = int(update_debt)
                update_debt -= updates_now
                row, transitions = acting.step(warming_up,
                                               while_waiting=lambda: run_updates(updates_now, not warming_up))
                executed, intervened = row[1], row[6]
                done = transitions.done
                if episodes is not None:
                    episodes.add(transitions.obs, executed, transitions.proposed_action, intervened, transitions.reward)
                finished = transitions.finished
                if marking:
                    pending.append(row)
                    if done[0]:
                        mark = operator.take_mark()
                        mark = operator.wait_for_mark() if mark is None else mark
                        if mark is None:   # stopped before marking: the episode is not stored
                            pending.clear()
                            if episodes is not None:
                                episodes.discard()
                            finished = []
                        else:
                            last = pending[-1]
                            last[2][0], last[4][0] = float(mark), bool(mark)   # the mark is the sparse reward
                            for stored in pending:
                                store(*stored)
                            pending.clear()
                            finished[0].success = bool(mark)
                elif transitions.aborted is not None and transitions.aborted.any():
                    # an env worker died mid-step: its row is no transition; its replay chain ends there
                    keep = ~transitions.aborted
                    store(*(part[keep] for part in row), env_index=np.flatnonzero(keep))
                    for index in np.flatnonzero(transitions.aborted):
                        online.end_stream(int(index))
                        offline.end_stream(int(takeover_streams[index]))
                else:
                    store(*row)
                if episodes is not None:
                    for outcome in finished:
                        index = outcome.env_index
                        if outcome.aborted:   # its env worker died: the episode is incomplete, not written
                            episodes.discard(index)
                            continue
                        episodes.finish(index, transitions.next_obs, outcome.success,
                                        bool(transitions.terminated[index]) or (marking and outcome.success),
                                        reward_last=float(outcome.success) if marking else None,
                                        metadata={"env_steps": loop.env_steps + config.num_envs,
                                                  "takeovers": outcome.takeovers})
                if end_of_step(config.num_envs, finished):
                    break
        finished_normally = True
    finally:
        loop.close()
        if robot_link is not None:
            # A learner that failed or was interrupted leaves the robot actor running with its last weights, so a
            # --resume reattaches to it by name; at the end of the budget the actor stops (the robot holds) unless
            # asked to keep acting
            if finished_normally and not config.robot_actor_keep_running:
                robot_link.stop()
            else:
                robot_link.detach()
                state = "is left with its loop stopped by the operator" if robot_link.stop_requested else \
                    "keeps running"
                print(f"the robot actor {robot_link.name!r} {state} (namespace {robot_link.namespace!r}; "
                      f"`robofinetune robot-actor stop --name={robot_link.name}` ends it)")
        else:
            (rollout if rollout is not None else ray_rollout).close()

    save_policy(policy, run.path / "policy", {**metadata, "env_steps": loop.env_steps})
    if robot_link is None:
        final = loop.evaluate(policy, episodes=config.final_eval_episodes, label="final")
    else:   # no evaluation episodes on the actor's robot (ROBOT_ACTOR_NO_EVALUATION): its training episodes instead
        final = None
        robot_episodes.log(run, loop.env_steps)
        loop.write_curve()   # the training episodes' curve, which evaluations draw otherwise
    if gate is not None:
        gate.consider(policy, loop.env_steps, metadata)
    save_checkpoint()  # the final evaluation point is part of the curve kept in the checkpoint
    base_point = next((point for point in loop.eval_points if point["label"] == "base"), None)
    if final is not None:
        run.write_json("eval.json", {**final.to_dict(), "base": base_point})
    summary = {
        "task": config.task,
        "base_success": base_point["success"] if base_point else None,
        "base_success_ci": base_point["ci"] if base_point else None,
        # null, not missing, without evaluations: benchmarks/residual_can.py and scripts/gpu_check.py read them
        "final_success": final.success_rate if final is not None else None,
        "final_success_ci": list(final.success_ci) if final is not None else None,
        "eval_episodes": final.episodes if final is not None else 0, "env_steps": loop.env_steps,
        "env_steps_to_90": loop.first_steps_reaching(0.9), "env_steps_to_95": loop.first_steps_reaching(0.95),
        "train_steps_to_90": loop.train_steps_reaching(0.9), "train_steps_to_95": loop.train_steps_reaching(0.95),
        "train_success_last": loop.recent_success_rate if loop.recent_success else None,
        "episodes": loop.episodes, "critic_updates": learner.critic_updates, "actor_updates": learner.actor_updates,
        "wall_clock_s": round(loop.seconds, 1), "seed": config.seed,
        "replay_features": feature_kind, "replay_bytes_per_transition": row_bytes, "policy_path": str(run.path / "policy"),
        "success_curve": str(run.path / "success_curve.png"),
        "gate_promotions": gate.promotions if gate is not None else None,
        "intervener": config.teleop or config.intervener,
        "operator_steps": loop.intervened_steps, "takeovers": loop.takeovers,
        "intervention_rate_first": loop.intervention_points[0][1] if loop.intervention_points else None,
        "intervention_rate_last": loop.intervention_rate if intervening else None,
        "episodes_dataset": str(episodes_path(run.path, episodes_format)) if episodes is not None else None,
        "stopped_by_operator": stopped_by_operator(),
    }
    if ray_rollout is not None:   # this run's part only: a resumed run's earlier parts are not counted
        overall = staleness_total.summary(reset=False)
        summary.update({"rollout_in_workers": True, "staleness_mean": overall["staleness_mean"],
                        "staleness_max": overall["staleness_max"],
                        "weights_publications": ray_rollout.broadcaster.publications,
                        "worker_restarts": ray_rollout.restarts, "dropped_episodes": ray_rollout.dropped_episodes})
    if robot_link is not None:   # this run's part only, as for the workers
        overall = staleness_total.summary(reset=False)
        last = robot_episodes.last
        summary.update({"robot_actor": robot_link.name, "evaluations": ROBOT_ACTOR_NO_EVALUATION,
                        # the actor's own training episodes (exploration noise included) in the last window
                        "train_episode_success": last["success"], "train_episode_success_episodes": last["episodes"],
                        "train_episode_success_env_steps": [last["env_steps_from"], last["env_steps"]],
                        "staleness_mean": overall["staleness_mean"], "staleness_max": overall["staleness_max"],
                        "weights_publications": robot_link.broadcaster.publications,
                        "robot_actor_left_running": config.robot_actor_keep_running})
    run.write_json("summary.json", summary)
    if base_point:
        low, high = base_point["ci"]
        print(f"base  success {base_point['success']:.1%} [{low:.1%}, {high:.1%}] over {base_point['episodes']} episodes")
    if final is not None:
        print(f"final success {final.success_rate:.1%} [{final.success_ci[0]:.1%}, {final.success_ci[1]:.1%}] over "
              f"{final.episodes} episodes after {loop.env_steps} env steps")
    else:
        last = robot_episodes.last
        print(f"no evaluation ({ROBOT_ACTOR_NO_EVALUATION}); training episodes (exploration noise included) "
              f"between env steps {last['env_steps_from']} and {last['env_steps']}: {last['episodes']} episodes, "
              f"success {'-' if last['success'] is None else format(last['success'], '.1%')}")
    return summary


# The CLI looks for these two names in every training method's module.
Config = ResidualConfig

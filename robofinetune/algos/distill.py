"""Consistency distillation: a one-step student of any diffusion or flow policy (PyTorch Lightning).

    states     each batch: ``demo_fraction`` of the observation histories from the teacher's demos, the rest
               from the teacher's own rollouts in the env (every visited state, successful episode or not),
               so the student learns where the teacher actually goes
    teacher    from fresh noise z, the teacher's deterministic solver (DDIM / Euler, ``teacher_steps`` steps)
               gives its ODE trajectory x_{t_0} = z, x_{t_1}, ..., x_{t_K} and the chunk it would execute
               (for a composite teacher, e.g. base + residual, the chunk its act() returns from that z)
    student    f(x_t, t) with the boundary-condition parameterisation of robofinetune.policies.consistency,
               initialised from the teacher's denoiser
    loss       mean over trajectory points k of || f(x_{t_k}, t_k) - target_k ||^2  (normalised action space)
               target = "endpoint":  target_k = the teacher's chunk (the exact consistency target: every point
                                     of one ODE trajectory maps to the trajectory's end)
               target = "bootstrap": target_k = f_ema(x_{t_{k+1}}, t_{k+1}) (classic consistency distillation
                                     with an EMA target network; the last point's target is the chunk).
                                     Measured on pointmass (500 steps, held-out states): one-step MSE to the
                                     teacher 0.085 and flat, vs 0.009 for "endpoint", which is the default
               -> AdamW, cosine lr, EMA of the student (the EMA weights are exported)

Teachers: any diffusion or flow policy (BC or OGPO/DPPO-fine-tuned: same kinds), and composites whose ``base``
is one (the residual policy). A diffusion teacher set to sample with DDPM is distilled along its DDIM
(probability-flow) ODE: same model, deterministic solver. A composite's act() returns as many actions as it
executes per plan (1 for the residual policy, which corrects every step); the student copies that chunking,
so it replans at every env step (still one network call per step, against the composite's DDIM-10 per chunk
plus its actor per step).

Image teachers: the student gets the teacher's observation encoder (same fields), its weights copied with the
denoiser's when ``init_from_teacher`` (the denoiser's weights only make sense on those features) and then
fine-tuned with the student. The summary reports ``student_latency_ms``, ``teacher_latency_ms`` and
``latency_ratio``: one act() from a raw observation at batch 1, image encoding included.

``robofinetune distill --teacher=PATH --task=can [--steps=1|2|4] [--key=value ...] [--resume=RUN]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from robofinetune.data.chunks import ActionChunkWindows
from robofinetune.data.episode import Episode
from robofinetune.errors import ConfigError, DatasetError
from robofinetune.images import is_image_key
from robofinetune.policies import GenerativePolicy, Policy, load_policy
from robofinetune.policies.base import ChainSample
from robofinetune.policies.consistency import ConsistencyPolicy, ConsistencyPolicyConfig
from robofinetune.runs import Run
from robofinetune.supervised import RunMetrics, export_and_evaluate, fit, warmup_cosine_optimizer

ROLLOUTS_FILE = "teacher_rollouts.hdf5"


@dataclass
class DistillConfig:
    task: str = ""                     # default: the teacher's task
    teacher: str = ""                  # teacher policy checkpoint folder (diffusion, flow, or a composite of one)
    dataset: str = ""                  # demo states; default: the dataset the teacher was trained on
    num_demos: int = 0                 # use the first N demos (0 = all)
    only_success: bool = True
    seed: int = 0
    # the student
    steps: int = 1                     # consistency steps the student's act() uses (1, or 2/4 for more quality)
    teacher_steps: int = 0             # teacher solver steps = trajectory points (0 = the teacher's inference_steps)
    target: str = "endpoint"           # endpoint | bootstrap (see the module docstring)
    init_from_teacher: bool = True     # start from the teacher's denoiser weights
    one_step_weight: float = 1.0       # loss weight of the pure-noise point (the one act() uses) vs the others
    points_per_chain: int = 0          # trajectory points trained per teacher chain (0 = all; always the first)
    # training states
    rollout_episodes: int = 50         # teacher episodes in the env (0 = demo states only)
    rollout_envs: int = 2
    rollout_seed: int = 50_000         # away from demo seeds (0...) and eval seeds (100_000...)
    demo_fraction: float = 0.5         # share of each batch drawn from demo states; the rest from rollouts
    # optimisation
    batch_size: int = 128              # states per batch; the student sees batch_size x points inputs
    max_steps: int = 3000
    learning_rate: float = 1e-3        # the student regresses fixed targets: higher than BC's 1e-4 works
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    ema_decay: float = 0.995
    checkpoint_every: int = 1000
    log_every: int = 50
    # scale (Lightning): several GPUs or nodes are a flag
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    # evaluation of the student at the end (0 = skip)
    eval_episodes: int = 20
    eval_envs: int = 2
    torch_threads: int = 0             # 0 = torch's default; 1 on a CPU shared with env processes


# --- the teacher: its generative core, its ODE trajectories and the chunks it executes -------------------------

def generative_base(teacher: Policy) -> GenerativePolicy:
    """The diffusion/flow model whose ODE the student follows: the teacher itself, or a composite's ``base``."""
    seen: Policy | None = teacher
    while seen is not None:
        if isinstance(seen, GenerativePolicy):
            if isinstance(seen, ConsistencyPolicy):
                raise ConfigError(f"teacher kind '{teacher.kind}' is (built on) a consistency student already; "
                                  "distil its diffusion or flow teacher instead")
            if seen.kind not in ("diffusion", "flow"):
                raise ConfigError(f"teacher kind '{seen.kind}': distillation supports diffusion and flow policies")
            return seen
        seen = getattr(seen, "base", None)
    raise ConfigError(f"teacher kind '{teacher.kind}' is not a diffusion or flow policy and has no generative "
                      "'base' to distil")


@contextlib.contextmanager
def pinned_base_noise(base: GenerativePolicy, noise: torch.Tensor, steps: int) -> Iterator[SimpleNamespace]:
    """While active, every ``base.sample`` call (e.g. inside a composite teacher's act()) starts from ``noise``,
    runs the deterministic ``steps``-step solver and records its chain in the yielded ``record.chain``."""
    record = SimpleNamespace(chain=None)
    original = base.sample

    def pinned(obs: dict[str, Any], *args: Any, return_chain: bool = False, **kwargs: Any) -> ChainSample:
        result = original(obs, steps=steps, noise=noise, return_chain=True)
        record.chain = result.chain
        return result if return_chain else ChainSample(result.actions, None)

    base.sample = pinned  # an instance attribute shadows the method for this object only
    try:
        yield record
    finally:
        del base.sample


class TeacherTargets:
    """``(obs, noise) -> (chain, target)``: the base's ODE trajectory from ``noise`` (B, K + 1, H, A) and the
    chunk the teacher executes from that same noise (B, H, A), both in the base's normalised action space.

    A plain teacher's chunk is its solver's end (clipped as its sample() clips). A composite teacher's act()
    is run with its base pinned to ``noise``; its output replaces the first ``executed_steps`` actions (the
    rest of the horizon keeps the base's chunk), so the student copies what the composite really does.
    """

    def __init__(self, teacher: Policy, steps: int) -> None:
        self.teacher = teacher
        self.base = generative_base(teacher)
        self.steps = steps
        self.composite = teacher is not self.base

    @torch.no_grad()
    def __call__(self, obs: dict[str, Any], noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.composite:
            chain = self.base.sample(obs, steps=self.steps, noise=noise, return_chain=True).chain
            return chain, chain[:, -1].clamp(-1.0, 1.0)
        numpy_obs = {key: value.cpu().numpy() if torch.is_tensor(value) else value for key, value in obs.items()}
        with pinned_base_noise(self.base, noise, self.steps) as record:
            executed = self.teacher.act(numpy_obs)
        chain = record.chain
        if chain is None:
            raise ConfigError(f"teacher kind '{self.teacher.kind}': its act() never sampled its base, so there is "
                              "no ODE trajectory to distil along")
        executed = torch.as_tensor(np.asarray(executed), dtype=torch.float32, device=chain.device)
        target = chain[:, -1].clamp(-1.0, 1.0).clone()
        target[:, : executed.shape[1]] = self.base.action_normalizer.normalize(executed)
        return chain, target

    def executed_steps(self, obs: dict[str, Any]) -> int:
        """How many actions of a chunk the teacher executes per plan (its act() length)."""
        if not self.composite:
            return self.base.config.n_action_steps
        return int(np.asarray(self.teacher.act(obs)).shape[1])


def teacher_grid(base: GenerativePolicy, steps: int) -> tuple[str, list[float]]:
    """The teacher's solver times in the order it visits them, noise end first."""
    if base.kind == "diffusion":
        # the very scheduler the teacher samples with, so the student's grid cannot drift from the teacher's
        return "diffusion", [float(t) for t in base._ddim(steps).timesteps]
    return "flow", [k / steps for k in range(steps)]


def build_student(teacher: Policy, config: DistillConfig, probe_obs: dict[str, Any]) -> ConsistencyPolicy:
    """A consistency policy with the base's observation layout, chunking, network and normalisers."""
    targets_of = TeacherTargets(teacher, 1)
    base = targets_of.base
    solver_steps = config.teacher_steps or base.config.inference_steps
    ode, grid = teacher_grid(base, solver_steps)
    if not 1 <= config.steps <= len(grid):
        raise ConfigError(f"config field 'steps' is {config.steps}; choose 1..{len(grid)} (teacher_steps)")
    # the observation encoder's fields too, so an image teacher's student reads the same cameras the same way
    inherited = {name: getattr(base.config, name) for name in (
        "task", "obs_keys", "obs_shapes", "action_dim", "n_obs_steps", "horizon", "network", "hidden_dim",
        "depth", "unet_dims", "chain_min_std", "encoder", "image_feature_dim", "augmentation", "shift_pad",
        "crop_fraction")}
    student_config = ConsistencyPolicyConfig(
        **inherited, n_action_steps=targets_of.executed_steps(probe_obs), inference_steps=config.steps, ode=ode,
        grid=grid, num_train_timesteps=getattr(base.config, "num_train_timesteps", 100),
        beta_schedule=getattr(base.config, "beta_schedule", "squaredcos_cap_v2"),
        # a composite may act outside the base's demo action range: do not clip the student to it
        clip_output=not targets_of.composite)
    student = ConsistencyPolicy(student_config).to(base.device)
    student.obs_normalizer.load_state_dict(base.obs_normalizer.state_dict())
    student.action_normalizer.load_state_dict(base.action_normalizer.state_dict())
    if config.init_from_teacher:
        if student.config.image_keys:
            # the teacher's denoiser weights only mean something on the teacher's features: copy its encoder too
            # (then fine-tuned with the student, end to end through the distillation loss)
            student.obs_encoder.load_state_dict(base.obs_encoder.state_dict())
        student.denoiser.load_state_dict(base.denoiser.state_dict())
        if ode == "diffusion" and student_config.prediction == "sample":
            # the output now means "chunk", not "noise": keep the teacher's features, start the head at zero
            head = [m for m in student.denoiser.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))][-1]
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
    return student


@torch.no_grad()
def act_latency_ms(policy: Policy, obs: dict[str, Any], repeats: int = 20) -> float:
    """Median wall time of one ``act`` from raw observation histories (B, n_obs_steps, ...), in ms: image
    decoding to floats and encoding included (the encoder runs inside act), after two warm-up calls."""
    numpy_obs = {key: value.cpu().numpy() if torch.is_tensor(value) else np.asarray(value) for key, value in obs.items()}
    was_training = policy.training
    policy.eval()
    times = []
    try:
        for index in range(repeats + 2):
            start = time.perf_counter()
            policy.act(numpy_obs)
            if index >= 2:
                times.append(time.perf_counter() - start)
    finally:
        policy.train(was_training)
    return 1000.0 * float(np.median(times))


# --- training states: demos and the teacher's own rollouts -------------------------------------------------------

@torch.no_grad()
def collect_teacher_rollouts(teacher: Policy, task: str, episodes: int, num_envs: int, seed: int,
                             progress: bool = True) -> list[Episode]:
    """Run the teacher as it acts (its select_action) for ``episodes`` finished episodes; every visited state."""
    from robofinetune.envs import make_vector_env
    from robofinetune.policies.checkpoint import check_policy_matches_env
    from robofinetune.rl.rollout import VectorRollout

    keys = list(teacher.config.obs_keys)
    envs = make_vector_env(task, num_envs=max(1, min(num_envs, episodes)), seed=seed)
    check_policy_matches_env(teacher, envs, source="teacher")
    rollout = VectorRollout(envs, reset_hooks=[teacher.reset])
    pending = [{"obs": {key: [] for key in keys}, "actions": []} for _ in range(rollout.num_envs)]
    finished: list[Episode] = []
    bar = tqdm(total=episodes, desc=f"teacher rollouts {task}", unit="ep", disable=not progress)
    try:
        rollout.reset(seed=seed)
        while len(finished) < episodes:
            step = rollout.step(teacher.select_action(rollout.obs))
            for index in range(rollout.num_envs):
                for key in keys:   # camera keys stay uint8, as datasets and policies keep them
                    dtype = np.uint8 if is_image_key(key) else np.float32
                    pending[index]["obs"][key].append(np.asarray(step.obs[key][index], dtype))
                pending[index]["actions"].append(step.action[index])
            for outcome in step.finished:
                record = pending[outcome.env_index]
                if len(finished) < episodes:
                    finished.append(Episode(
                        observations={key: np.stack(values) for key, values in record["obs"].items()},
                        actions=np.stack(record["actions"]), success=outcome.success,
                        final_observation={key: np.asarray(step.next_obs[key][outcome.env_index]) for key in keys},
                        metadata={"source": "teacher_rollout", "seed": seed}))
                    bar.update(1)
                    bar.set_postfix(success=f"{np.mean([e.success for e in finished]):.0%}")
                pending[outcome.env_index] = {"obs": {key: [] for key in keys}, "actions": []}
    finally:
        bar.close()
        rollout.close()
        teacher.reset()
    return finished


def teacher_dataset(teacher: Policy, config: DistillConfig) -> Path:
    """The demos the teacher (or its base) was trained on, as its checkpoint metadata says; else the default."""
    if config.dataset:
        return Path(config.dataset)
    for policy in (teacher, getattr(teacher, "base", None)):
        dataset = getattr(policy, "checkpoint_metadata", {}).get("dataset") if policy is not None else None
        if dataset:
            return Path(dataset)
    from robofinetune.algos.bc import default_dataset

    return default_dataset(config.task)


def load_demo_episodes(teacher: Policy, config: DistillConfig) -> tuple[Path, list[Episode]]:
    from robofinetune.data.io import load_dataset
    from robofinetune.data.task_check import check_training_demos
    from robofinetune.envs import load_task_spec

    path = teacher_dataset(teacher, config)
    if not path.exists():
        if config.rollout_episodes > 0:
            warnings.warn(f"{path}: demo dataset not found; distilling on teacher rollout states only", stacklevel=2)
            return path, []
        raise DatasetError(f"{path}: demo dataset not found and rollout_episodes is 0: no training states")
    episodes, env_meta = load_dataset(path, obs_keys=list(teacher.config.obs_keys))
    check_training_demos(episodes, env_meta, load_task_spec(config.task or teacher.config.task), str(path),
                         obs_shapes=teacher.config.obs_shapes)
    if config.only_success:
        episodes = [episode for episode in episodes if episode.success]
    if config.num_demos:
        episodes = episodes[: config.num_demos]
    return path, episodes


class MixedStateBatches(torch.utils.data.IterableDataset):
    """Batches of observation histories, a fixed share from each source (demos, rollouts)."""

    def __init__(self, sources: list[tuple[ActionChunkWindows, float]], batch_size: int, batches_per_epoch: int,
                 seed: int) -> None:
        total = sum(share for _, share in sources)
        self.sources = [(windows, share / total) for windows, share in sources if share > 0]
        counts = [int(round(share * batch_size)) for _, share in self.sources]
        counts[-1] = batch_size - sum(counts[:-1])
        self.counts = counts
        self.batches_per_epoch, self.seed, self.epoch = batches_per_epoch, seed, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        rng = np.random.default_rng([self.seed, self.epoch, rank])
        self.epoch += 1
        for _ in range(self.batches_per_epoch):
            parts = [windows.batch(rng.integers(0, len(windows), size=count))[0]
                     for (windows, _), count in zip(self.sources, self.counts) if count > 0]
            yield {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


# --- the update step ---------------------------------------------------------------------------------------------

def distillation_loss(student: ConsistencyPolicy, target_student: ConsistencyPolicy, teacher: TeacherTargets,
                      obs: dict[str, torch.Tensor], config: DistillConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch of consistency distillation; returns the loss and diagnostics (see the module docstring)."""
    condition = student.encode_observation(obs)
    batch = condition.shape[0]
    noise = torch.randn(batch, student.config.horizon, student.config.action_dim, device=condition.device)
    chain, chunk = teacher(obs, noise)                                     # (B, K+1, H, A), (B, H, A)
    grid = torch.tensor(student.config.grid, device=condition.device, dtype=torch.float32)
    # points where f is the identity (c_out = 0, the diffusion grid's t = 0) carry no gradient: skip them
    trainable = [k for k in range(len(grid)) if float(student.boundary_scalings(grid[k: k + 1])[1]) > 0]
    points = trainable
    if 0 < config.points_per_chain < len(trainable):
        others = torch.randperm(len(trainable) - 1)[: config.points_per_chain - 1] + 1
        points = [trainable[0]] + sorted(trainable[int(i)] for i in others)
    count = len(points)
    index = torch.tensor(points, device=condition.device)
    inputs = chain[:, index].reshape(batch * count, *chain.shape[2:])
    times = grid[index].repeat(batch)
    predicted = student.consistency_function(inputs, times, condition.repeat_interleave(count, dim=0))
    predicted = predicted.reshape(batch, count, *chain.shape[2:])
    if config.target == "endpoint":
        targets = chunk[:, None].expand_as(predicted)
    else:
        with torch.no_grad():
            targets = chunk[:, None].repeat(1, count, 1, 1)
            following = [(row, k + 1) for row, k in enumerate(points) if k + 1 in trainable]
            if following:
                rows = torch.tensor([row for row, _ in following], device=condition.device)
                nexts = torch.tensor([k for _, k in following], device=condition.device)
                ahead = target_student.consistency_function(
                    chain[:, nexts].reshape(batch * len(following), *chain.shape[2:]), grid[nexts].repeat(batch),
                    condition.repeat_interleave(len(following), dim=0))
                targets[:, rows] = target_student.clip_chunk(ahead).reshape(batch, len(following), *chain.shape[2:])
    per_point = (predicted - targets).pow(2).mean(dim=(0, 2, 3))         # (count,)
    weights = torch.ones(count, device=condition.device)
    weights[0] = config.one_step_weight
    loss = (weights * per_point).sum() / weights.sum()
    with torch.no_grad():
        one_step_error = (student.clip_chunk(predicted[:, 0]) - chunk).pow(2).mean()
    return loss, {"one_step_mse": float(one_step_error)}


def ema_with_warmup(decay: float):
    """EMA whose decay ramps up as (1 + n) / (10 + n) to ``decay``: a short distillation (a few hundred steps)
    otherwise exports weights still dominated by the initial ones."""

    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        rate = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return rate * averaged + (1.0 - rate) * current

    return average


class DistillModule(L.LightningModule):
    def __init__(self, student: ConsistencyPolicy, teacher: Policy, config: DistillConfig, solver_steps: int) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False)   # a submodule so Lightning moves it to the device
        self.teacher_targets = TeacherTargets(teacher, solver_steps)
        self.ema = AveragedModel(student, avg_fn=ema_with_warmup(config.ema_decay), use_buffers=True)
        self.distill_config = config

    def train(self, mode: bool = True) -> "DistillModule":
        super().train(mode)
        self.teacher.eval()   # the teacher is frozen, always in eval mode
        return self

    def training_step(self, obs: dict[str, torch.Tensor], batch_index: int) -> torch.Tensor:
        loss, stats = distillation_loss(self.student, self.ema.module, self.teacher_targets, obs, self.distill_config)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/one_step_mse", stats["one_step_mse"], prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        self.ema.update_parameters(self.student)

    def configure_optimizers(self):
        return warmup_cosine_optimizer(self.student.parameters(), self.distill_config)

    @property
    def ema_student(self) -> ConsistencyPolicy:
        return self.ema.module


# --- the command ---------------------------------------------------------------------------------------------------

def _check_config(config: DistillConfig) -> None:
    if not config.teacher:
        raise ConfigError("config field 'teacher' is empty: pass --teacher=PATH (a policy checkpoint folder)")
    if config.target not in ("endpoint", "bootstrap"):
        raise ConfigError(f"config field 'target' is {config.target!r}; choose 'endpoint' or 'bootstrap'")
    if not 0.0 <= config.demo_fraction <= 1.0:
        raise ConfigError(f"config field 'demo_fraction' is {config.demo_fraction}; it must lie in [0, 1]")
    if config.batch_size < 1 or config.max_steps < 1:
        raise ConfigError("config fields 'batch_size' and 'max_steps' must be >= 1")


def train_distill(config: DistillConfig, run: Run, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Distil, export ``<run>/policy`` (EMA student), evaluate it, and return a summary dict."""
    _check_config(config)
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    teacher = load_policy(config.teacher, device="cpu", task=config.task or None)
    config.task = config.task or teacher.config.task
    base = generative_base(teacher)
    solver_steps = config.teacher_steps or base.config.inference_steps
    keys = list(teacher.config.obs_keys)

    dataset_path, demos = load_demo_episodes(teacher, config)
    rollouts: list[Episode] = []
    rollout_path = run.path / ROLLOUTS_FILE
    if config.rollout_episodes > 0:
        from robofinetune.data.io import load_dataset, save_dataset

        if rollout_path.exists():  # --resume: the states the first attempt collected
            rollouts, _ = load_dataset(rollout_path, obs_keys=keys)
        else:
            start = time.time()
            rollouts = collect_teacher_rollouts(teacher, config.task, config.rollout_episodes, config.rollout_envs,
                                                config.rollout_seed, progress=progress)
            save_dataset(rollouts, rollout_path, env_meta={"env_name": config.task, "task": config.task,
                                                            "source": "teacher_rollout", "teacher": config.teacher})
            run.write_json("rollouts.json", {"episodes": len(rollouts), "seconds": time.time() - start,
                                             "success": float(np.mean([e.success for e in rollouts]))})
    windows: dict[str, ActionChunkWindows] = {}
    for name, episodes in (("demos", demos), ("rollouts", rollouts)):
        if episodes:
            windows[name] = ActionChunkWindows(episodes, keys, base.config.n_obs_steps, base.config.horizon,
                                               source=str(rollout_path if name == "rollouts" else dataset_path))
    shares = {"demos": config.demo_fraction, "rollouts": 1.0 - config.demo_fraction}
    if len(windows) == 1:  # only one source exists: all states come from it
        shares = {name: 1.0 for name in windows}
    sources = [(windows[name], shares[name]) for name in windows if shares[name] > 0]
    if not sources:
        raise DatasetError(f"no training states: {dataset_path} gave {len(demos)} demos, {len(rollouts)} rollouts, "
                           f"demo_fraction={config.demo_fraction}")
    probe = next(iter(windows.values())).batch(np.arange(min(2, len(next(iter(windows.values()))))))[0]
    student = build_student(teacher, config, {key: value.numpy() for key, value in probe.items()})
    module = DistillModule(student, teacher, config, solver_steps)

    state_counts = {name: len(value) for name, value in windows.items()}
    metadata = {"task": config.task, "teacher": str(config.teacher), "teacher_kind": teacher.kind,
                "teacher_base_kind": base.kind, "teacher_steps": solver_steps, "target": config.target,
                "dataset": str(dataset_path), "demos": len(demos), "rollout_episodes": len(rollouts),
                "training_states": state_counts, "demo_fraction": config.demo_fraction, "run": str(run.path),
                "made_by": f"robofinetune distill --teacher={config.teacher} --task={config.task} --steps={config.steps}"}
    batches_per_epoch = max(1, min(1000, sum(state_counts.values()) // config.batch_size))
    loader = torch.utils.data.DataLoader(MixedStateBatches(sources, config.batch_size, batches_per_epoch, config.seed),
                                         batch_size=None)
    metrics = RunMetrics(run, config, metadata, ("train/loss", "train/one_step_mse"),
                         lambda module: module.ema_student)
    trainer, train_seconds = fit(module, loader, run, config, metrics, resume, progress)
    summary: dict[str, Any] = {"task": config.task, "teacher": str(config.teacher), "teacher_kind": teacher.kind,
                               "student_steps": config.steps, "train_steps": trainer.global_step,
                               "train_seconds": train_seconds, "training_states": state_counts,
                               "teacher_rollout_success": float(np.mean([e.success for e in rollouts])) if rollouts else None,
                               "policy_path": str(run.path / "policy")}
    if not trainer.is_global_zero:
        return summary
    # per chunk from one observation history (batch 1, as on a robot), images encoded inside act()
    single = {key: value[:1].numpy() for key, value in probe.items()}
    student_ms = act_latency_ms(module.ema_student.cpu(), single)
    teacher_ms = act_latency_ms(teacher.cpu(), single)
    summary.update(student_latency_ms=student_ms, teacher_latency_ms=teacher_ms,
                   latency_ratio=teacher_ms / max(student_ms, 1e-9))
    return export_and_evaluate(module.ema_student.eval(), run, config, metadata, summary, progress)


# The CLI's `train` command looks for these two names in every training method's module.
Config = DistillConfig
train = train_distill


_FIELD_HELP = {"teacher": "teacher policy checkpoint folder (required unless --resume)",
               "task": "task (default: the teacher's; picks the preset configs/distill/<task>.yaml)",
               "steps": "consistency steps per chunk the student's act() uses: 1 (default), or 2/4 for quality"}


def _option_value(text: str) -> Any:
    """Option values are read as YAML (numbers, true/false, lists); the config then checks each field's type."""
    import yaml

    return yaml.safe_load(text) if text != "" else ""


def add_distill_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``robofinetune distill``: one option per DistillConfig field; sets ``handler`` (the CLI's convention)."""
    parser = subparsers.add_parser(
        "distill", help="one-step consistency student of a diffusion or flow policy",
        description="Distil a policy into a one-step consistency student. Config: DistillConfig defaults <- "
                    "configs/distill/<task>.yaml <- --config YAML <- these options.")
    parser.add_argument("--resume", help="continue the run in this folder from its last checkpoint")
    parser.add_argument("--config", help="a YAML of config fields applied after the task preset")
    parser.add_argument("--runs-dir", help="where run folders go (default ./runs)")
    for item in dataclasses.fields(DistillConfig):
        spellings = [f"--{item.name.replace('_', '-')}"] + ([f"--{item.name}"] if "_" in item.name else [])
        parser.add_argument(*spellings, dest=item.name, type=_option_value, default=argparse.SUPPRESS,
                            help=_FIELD_HELP.get(item.name, f"config field (default {item.default!r})"))
    parser.set_defaults(handler=command_distill)
    return parser


def command_distill(args: argparse.Namespace) -> int:
    from robofinetune.config import config_from_dict, resolve_config
    from robofinetune.policies.checkpoint import read_policy_document

    overrides = {item.name: getattr(args, item.name) for item in dataclasses.fields(DistillConfig)
                 if hasattr(args, item.name)}
    if args.resume:
        from robofinetune.cli import _resume_overrides

        run = Run.open(args.resume)
        saved = run.saved_config()
        # as `train --resume`: only how long and how the run is watched may change, never what it learns with
        extended = _resume_overrides(overrides, saved, run.path)
        config = config_from_dict(DistillConfig, {**saved, **extended}, str(run.path / "config.yaml"))
        if extended:
            run.save_config(config)
            print(f"resuming with {extended} (config.yaml updated)")
        print(f"resuming {run.path}")
    else:
        if not overrides.get("teacher"):
            raise ConfigError("distill needs --teacher=PATH (a policy checkpoint folder)")
        if not overrides.get("task"):  # the task picks the preset, so take the teacher's before resolving
            overrides["task"] = read_policy_document(overrides["teacher"])["config"]["task"]
        config = resolve_config(DistillConfig, "distill", overrides, extra_preset=args.config)
        _check_config(config)
        run = Run.create("distill", config.task, config, root=args.runs_dir)
        print(f"run folder: {run.path}")
    from robofinetune.logs import LOG_FILE_NAME, set_log_file

    set_log_file(run.path / LOG_FILE_NAME)
    summary = train_distill(config, run, resume=bool(args.resume))
    run.close()
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"run folder: {run.path}")
    return 0

"""Behaviour cloning of a diffusion or flow policy over action chunks (PyTorch Lightning).

    for each step: draw (observation history, action chunk) windows from the demos
                   loss = denoising (diffusion) or velocity-matching (flow) error      -> AdamW, cosine lr
                   EMA of the weights (the EMA weights are what gets exported and evaluated)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from robofinetune.data.chunks import ActionChunkWindows, RandomBatches
from robofinetune.errors import ConfigError
from robofinetune.policies import POLICY_TYPES, GenerativePolicy, save_policy
from robofinetune.runs import Run
from robofinetune.supervised import RunMetrics, export_and_evaluate, fit, warmup_cosine_optimizer


@dataclass
class BCConfig:
    task: str = "can"
    policy: str = "diffusion"          # diffusion | flow
    dataset: str = ""                  # default: datasets/<task>_scripted_200.hdf5 (collected if absent)
    num_demos: int = 0                 # use the first N demos (0 = all)
    only_success: bool = True          # train on successful demos only
    seed: int = 0
    # a trained policy folder to start from (train a finished run longer, or fine-tune it on new demos): same policy
    # type and network, same observation keys and shapes; its weights and normalizers are kept, the schedule restarts
    init_policy: str = ""
    # policy shape
    n_obs_steps: int = 2
    horizon: int = 8
    n_action_steps: int = 4
    network: str = "mlp"               # mlp (CPU default) | unet
    hidden_dim: int = 512
    depth: int = 3
    unet_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    num_train_timesteps: int = 100     # diffusion only
    sampler: str = "ddim"              # diffusion only: ddim | ddpm
    inference_steps: int = 10
    # camera observations (tasks with <camera>_image keys): robofinetune.policies.encoders
    encoder: str = "conv"              # conv (DrQ, 4 layers) | strided_conv (LeRobot SAC, 4 stride-2) | resnet18 (GroupNorm, spatial softmax)
    image_feature_dim: int = 64        # features per camera and time step
    augmentation: str = "shift"        # shift (DrQ, +-shift_pad px) | crop (crop_fraction; centre crop at eval) | none
    shift_pad: int = 4
    crop_fraction: float = 0.9
    # optimisation
    batch_size: int = 256
    max_steps: int = 20000
    learning_rate: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 500
    ema_decay: float = 0.995
    checkpoint_every: int = 2000
    log_every: int = 50
    # scale (Lightning): several GPUs or nodes are a flag
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    # evaluation at the end (0 = skip)
    eval_episodes: int = 20
    eval_envs: int = 2


class BCModule(L.LightningModule):
    def __init__(self, policy: GenerativePolicy, config: BCConfig) -> None:
        super().__init__()
        self.policy = policy
        self.ema = AveragedModel(policy, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        self.bc_config = config

    def training_step(self, batch: tuple[dict[str, torch.Tensor], torch.Tensor], batch_index: int) -> torch.Tensor:
        obs, actions = batch
        loss = self.policy.bc_loss(obs, actions)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        self.ema.update_parameters(self.policy)

    def configure_optimizers(self):
        return warmup_cosine_optimizer(self.policy.parameters(), self.bc_config)

    @property
    def ema_policy(self) -> GenerativePolicy:
        return self.ema.module


def default_dataset(task: str) -> Path:
    from robofinetune.paths import datasets_dir

    return datasets_dir() / f"{task}_scripted_200.hdf5"


def ensure_default_dataset(task: str, path: Path) -> None:
    """Collect the default scripted dataset when it is missing, so a fresh clone can train at once."""
    if path.exists():
        return
    from robofinetune.data.collect import collect_episodes, default_collect_envs
    from robofinetune.data.robomimic_io import save_robomimic

    num_envs = default_collect_envs()
    print(f"{path} not found: collecting 200 scripted {task} demos in {num_envs} env processes (robofinetune "
          f"collect --task={task} --source=scripted --episodes=200)", flush=True)
    episodes = collect_episodes(task, 200, source="scripted", seed=0, num_envs=num_envs)
    save_robomimic(episodes, path, env_meta={"env_name": task, "task": task})


def load_demos(config: BCConfig):
    from robofinetune.data.io import load_dataset
    from robofinetune.data.task_check import check_training_demos
    from robofinetune.envs import load_task_spec

    spec = load_task_spec(config.task)
    path = Path(config.dataset) if config.dataset else default_dataset(config.task)
    if not config.dataset:
        ensure_default_dataset(config.task, path)
    episodes, env_meta = load_dataset(path, obs_keys=list(spec.obs_keys))
    check_training_demos(episodes, env_meta, spec, str(path))
    if config.only_success:
        episodes = [episode for episode in episodes if episode.success]
    if config.num_demos:
        episodes = episodes[: config.num_demos]
    return spec, path, episodes


def build_policy(config: BCConfig, spec: Any) -> GenerativePolicy:
    from robofinetune.policies.encoders import AUGMENTATIONS, ENCODERS

    if config.policy not in POLICY_TYPES:
        raise ConfigError(f"config field 'policy' is '{config.policy}'; choose one of {sorted(POLICY_TYPES)}")
    if config.encoder not in ENCODERS:
        raise ConfigError(f"config field 'encoder' is '{config.encoder}'; choose one of {list(ENCODERS)}")
    if config.augmentation not in AUGMENTATIONS:
        raise ConfigError(f"config field 'augmentation' is '{config.augmentation}'; choose one of "
                          f"{list(AUGMENTATIONS)}")
    policy_class, config_class = POLICY_TYPES[config.policy]
    policy_kwargs = dict(task=config.task, obs_keys=list(spec.obs_keys),
                         obs_shapes={key: list(shape) for key, shape in spec.obs_shapes.items()},
                         action_dim=spec.action_dim, n_obs_steps=config.n_obs_steps, horizon=config.horizon,
                         n_action_steps=config.n_action_steps, network=config.network, hidden_dim=config.hidden_dim,
                         depth=config.depth, unet_dims=list(config.unet_dims), inference_steps=config.inference_steps,
                         encoder=config.encoder, image_feature_dim=config.image_feature_dim,
                         augmentation=config.augmentation, shift_pad=config.shift_pad,
                         crop_fraction=config.crop_fraction)
    if config.policy == "diffusion":
        policy_kwargs.update(num_train_timesteps=config.num_train_timesteps, sampler=config.sampler)
    return policy_class(config_class(**policy_kwargs))


def train_bc(config: BCConfig, run: Run, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, export ``<run>/policy`` (EMA weights), evaluate, and return a summary dict."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    spec, dataset_path, episodes = load_demos(config)
    windows = ActionChunkWindows(episodes, list(spec.obs_keys), config.n_obs_steps, config.horizon,
                                 source=str(dataset_path))
    policy = build_policy(config, spec)
    policy.set_normalizers(windows.flat_observations(), windows.actions)
    metadata = {"task": config.task, "dataset": str(dataset_path), "demos": len(episodes), "run": str(run.path),
                "made_by": f"robofinetune train bc --task={config.task} --policy={config.policy}"}
    if config.init_policy:
        load_initial_weights(policy, config)   # before the EMA copy is made
        metadata.update(initial_training(config.init_policy))
    module = BCModule(policy, config)
    batches_per_epoch = max(1, min(1000, len(windows) // config.batch_size))
    loader = torch.utils.data.DataLoader(RandomBatches(windows, config.batch_size, batches_per_epoch, config.seed),
                                         batch_size=None)
    metrics = RunMetrics(run, config, metadata, ("train/loss",), lambda module: module.ema_policy)
    trainer, train_seconds = fit(module, loader, run, config, metrics, resume, progress)
    summary: dict[str, Any] = {"task": config.task, "policy": config.policy, "demos": len(episodes),
                               "train_steps": trainer.global_step, "train_seconds": train_seconds,
                               "policy_path": str(run.path / "policy")}
    if not trainer.is_global_zero:
        return summary
    return export_and_evaluate(module.ema_policy.eval(), run, config, metadata, summary, progress)


# what may differ between init_policy and the policy being trained: how a chunk is executed and sampled, not what
# the network is
INIT_MAY_DIFFER = ("n_action_steps", "inference_steps", "sampler", "augmentation", "shift_pad", "crop_fraction")


def initial_training(policy_path: str | Path) -> dict[str, Any]:
    """What training a policy started from (``init_policy``) already had, so the new policy's card can state the
    whole: its folder, and the steps and seconds of every run in its lineage."""
    from robofinetune.policies.checkpoint import read_policy_document

    metadata = read_policy_document(policy_path).get("metadata", {})
    return {"init_policy": str(policy_path),
            "prior_train_steps": int(metadata.get("prior_train_steps", 0)) + int(metadata.get("train_steps") or 0),
            "prior_train_seconds": float(metadata.get("prior_train_seconds", 0.0))
            + float(metadata.get("train_seconds") or 0.0)}


def load_initial_weights(policy: GenerativePolicy, config: BCConfig) -> None:
    """Copy ``config.init_policy``'s weights and normalizers into ``policy``, refusing one built differently."""
    from dataclasses import asdict

    from robofinetune.policies import load_policy

    path = Path(config.init_policy)
    if not path.exists():
        raise ConfigError(f"config field 'init_policy': {path} does not exist (a policy folder, e.g. <run>/policy)")
    initial = load_policy(path, device="cpu")
    if type(initial) is not type(policy):
        raise ConfigError(f"config field 'init_policy': {path} is a {type(initial).__name__}, this run trains a "
                          f"{type(policy).__name__} (policy: {config.policy})")
    wanted, found = asdict(policy.config), asdict(initial.config)
    different = {key: (found.get(key), value) for key, value in wanted.items()
                 if key not in INIT_MAY_DIFFER and found.get(key) != value}
    if different:
        fields = ", ".join(f"{key}: {have!r} there, {want!r} here" for key, (have, want) in different.items())
        raise ConfigError(f"config field 'init_policy': {path} was built differently ({fields})")
    policy.load_state_dict(initial.state_dict())


# The CLI looks for these two names in every training method's module.
Config = BCConfig
train = train_bc


def export_checkpoint_policy(run_path: str | Path, checkpoint: str | Path, output: str | Path,
                             metadata: dict[str, Any] | None = None) -> Path:
    """Export the EMA policy stored in one of a BC run's Lightning checkpoints (e.g. an early one, to make a
    deliberately weak base or a spread of policies for OPE) as a normal policy folder."""
    from robofinetune.policies import load_policy

    run_path = Path(run_path)
    policy = load_policy(run_path / "policy", device="cpu")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    ema_state = {key[len("ema.module."):]: value for key, value in state.items() if key.startswith("ema.module.")}
    policy.load_state_dict(ema_state)
    step = torch.load(checkpoint, map_location="cpu", weights_only=False).get("global_step")
    return save_policy(policy, output, {**policy.checkpoint_metadata, "train_steps": step,
                                        "exported_from": str(checkpoint), **(metadata or {})})

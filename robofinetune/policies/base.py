"""The Policy interface every stage shares, and the action-chunk bookkeeping every generative policy needs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from torch import nn

from robofinetune.errors import TaskError
from robofinetune.images import image_keys, is_image_key, state_keys
from robofinetune.policies.normalizer import MinMaxNormalizer


@dataclass
class PolicyConfig:
    """What a checkpoint must remember to rebuild its policy and check it against an env."""

    task: str
    obs_keys: list[str]
    obs_shapes: dict[str, list[int]]
    action_dim: int
    n_obs_steps: int = 2          # observation history the policy conditions on
    horizon: int = 8              # predicted action chunk length
    n_action_steps: int = 4       # how many of the predicted actions are executed before re-planning
    network: str = "mlp"          # "mlp" (residual MLP, CPU default) or "unet" (1-D temporal UNet)
    hidden_dim: int = 512
    depth: int = 3
    unet_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    inference_steps: int = 10     # denoising / Euler steps used by act()
    chain_min_std: float = 0.1    # std floor of each stochastic chain transition (DPPO's min std)
    # camera observations (obs keys ``<camera>_image``; see robofinetune.policies.encoders), unused without them
    encoder: str = "conv"         # per-camera backbone: "conv" (DrQ-style) | "resnet18" (GroupNorm, spatial softmax)
    image_feature_dim: int = 64   # features per camera and time step
    augmentation: str = "shift"   # training only: "shift" (+-shift_pad px) | "crop" (centre crop at eval) | "none"
    shift_pad: int = 4
    crop_fraction: float = 0.9    # 84 -> 76

    @property
    def obs_dim(self) -> int:
        """Flat size of all observation keys (images included; a state-only policy's condition per step)."""
        return int(sum(int(np.prod(self.obs_shapes[key])) for key in self.obs_keys))

    @property
    def image_keys(self) -> list[str]:
        """The camera keys (``<camera>_image``) among ``obs_keys``: the camera set the policy was trained on."""
        return image_keys(self.obs_keys)

    @property
    def state_keys(self) -> list[str]:
        return state_keys(self.obs_keys)

    @property
    def state_dim(self) -> int:
        return int(sum(int(np.prod(self.obs_shapes[key])) for key in self.state_keys))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChainSample(NamedTuple):
    """Output of :meth:`GenerativePolicy.sample`.

    ``actions`` are in the env's action units, (B, horizon, A). ``chain`` holds every intermediate of the
    denoising / integration chain in normalised action space, (B, K + 1, horizon, A): ``chain[:, 0]`` is the
    initial noise and ``chain[:, -1]`` the final (unclipped) normalised action chunk.
    """

    actions: torch.Tensor
    chain: torch.Tensor | None


class Policy(nn.Module, ABC):
    """Maps observations to actions. ``select_action`` runs one env step; ``act`` returns a whole chunk.

    Policies keep per-env state (observation history, queued actions), so call ``reset()`` at the start of
    every episode; with vector envs, ``reset(env_index)`` clears one env's state when it alone restarts.
    """

    config: PolicyConfig

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @abstractmethod
    def act(self, obs: dict[str, np.ndarray | torch.Tensor]) -> np.ndarray:
        """Action chunk to execute, (B, n_action_steps, A), from observation history (B, n_obs_steps, ...)."""

    @abstractmethod
    def reset(self, env_index: int | None = None) -> None:
        """Forget history and queued actions (of one env, or of all)."""

    @abstractmethod
    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One action per env, (B, A), from the current observation of each env (B, ...)."""

    def seed_sampling(self, seed: int | None) -> None:
        """Make the policy's sampling noise a function of ``(seed, env index, episode index)`` only, so an
        evaluation repeats its episodes whatever ran before it in the process; ``None`` goes back to torch's
        global generator. Episode indices count ``reset(env_index)`` calls from the last ``reset()``.
        Deterministic policies have nothing to seed."""


class GenerativePolicy(Policy):
    """A conditional generative model over action chunks with an explicit stochastic denoising chain.

    Subclasses (diffusion, flow) implement ``sample``, ``chain_log_prob`` and ``bc_loss``; this class handles
    observation normalisation, history stacking and executing chunks step by step.
    """

    kind: str = "generative"

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        if config.image_keys:
            from robofinetune.policies.encoders import ObservationEncoder

            self.obs_encoder = ObservationEncoder(config.obs_keys, config.obs_shapes, config.encoder,
                                                  config.image_feature_dim, config.augmentation, config.shift_pad,
                                                  config.crop_fraction)
            # the encoder owns the state statistics (stored once, as obs_encoder.state_normalizer.*); the name
            # every state-only policy has (obs_normalizer.*) is an unregistered alias of them
            object.__setattr__(self, "obs_normalizer", self.obs_encoder.state_normalizer)
        else:
            self.obs_normalizer = MinMaxNormalizer(config.obs_dim)
        self.action_normalizer = MinMaxNormalizer(config.action_dim)
        self._history: list[deque] = []
        self._queues: list[deque] = []
        self._sampling_seed: int | None = None
        self._episode_generators: list[torch.Generator] = []
        self._episode_counts: list[int] = []

    # --- conditioning -------------------------------------------------------------------------------------
    def check_observation(self, obs: dict[str, Any], has_history: bool) -> None:
        """Raise TaskError naming the key when ``obs`` does not match this policy's observation layout."""
        for key in self.config.obs_keys:
            if key not in obs:
                cameras = f" (it was trained on cameras {self.config.image_keys})" if is_image_key(key) else ""
                raise TaskError(f"policy for task '{self.config.task}' needs observation key '{key}'{cameras}; "
                                f"got keys {sorted(obs)}")
            expected = tuple(self.config.obs_shapes[key])
            shape = tuple(obs[key].shape[2:] if has_history else obs[key].shape[1:])
            if shape != expected:
                raise TaskError(f"observation '{key}' has shape {shape}, policy for task '{self.config.task}' "
                                f"expects {expected}")
            if is_image_key(key):
                dtype = obs[key].dtype
                if dtype not in (np.uint8, torch.uint8):
                    raise TaskError(f"observation '{key}' is {dtype}; policy for task '{self.config.task}' takes "
                                    f"images as uint8 (0..255)")

    def encode_observation(self, obs: dict[str, Any]) -> torch.Tensor:
        """Flattened, normalised observation history (B, n_obs_steps * per-step features) from (B, n_obs_steps, ...).

        State-only: the min-max normalised state keys. With cameras: per step, each camera's image features and
        then the normalised state keys (:class:`~robofinetune.policies.encoders.ObservationEncoder`; images go
        in as uint8 and are augmented in training mode only)."""
        if self.config.image_keys:
            features = self.obs_encoder(obs)
            batch, steps, _ = features.shape
            if steps != self.config.n_obs_steps:
                raise TaskError(f"observation history has {steps} steps, policy expects {self.config.n_obs_steps}")
            return features.reshape(batch, -1)
        parts = []
        for key in self.config.obs_keys:
            value = torch.as_tensor(np.asarray(obs[key]) if not torch.is_tensor(obs[key]) else obs[key],
                                    dtype=torch.float32, device=self.device)
            parts.append(value.reshape(value.shape[0], value.shape[1], -1))
        flat = torch.cat(parts, dim=-1)
        batch, steps, _ = flat.shape
        if steps != self.config.n_obs_steps:
            raise TaskError(f"observation history has {steps} steps, policy expects {self.config.n_obs_steps}")
        return self.obs_normalizer.normalize(flat).reshape(batch, -1)

    @property
    def condition_dim(self) -> int:
        if self.config.image_keys:
            return self.config.n_obs_steps * self.obs_encoder.output_dim
        return self.config.n_obs_steps * self.config.obs_dim

    def set_normalizers(self, observations: np.ndarray, actions: np.ndarray) -> None:
        """Fit normalisers on the training data: flat state observations (N, state_dim), the state keys in
        ``obs_keys`` order (all keys for a policy without cameras), and actions (N, A)."""
        observations = np.asarray(observations)
        if observations.ndim != 2 or observations.shape[1] != self.config.state_dim:
            raise ValueError(f"set_normalizers needs flat state observations (N, {self.config.state_dim}) of keys "
                             f"{self.config.state_keys}, got shape {observations.shape}")
        self.obs_normalizer.load_state_dict(MinMaxNormalizer.from_data(observations).state_dict())
        self.action_normalizer.load_state_dict(MinMaxNormalizer.from_data(actions).state_dict())

    # --- the generative model (implemented by diffusion and flow) ----------------------------------------
    @abstractmethod
    def sample(self, obs: dict[str, Any], steps: int | None = None, noise: torch.Tensor | None = None,
               return_chain: bool = False, stochastic: bool = False,
               generator: SamplingGenerator = None) -> ChainSample:
        """Draw action chunks. ``noise`` fixes the initial latent; ``stochastic`` makes every transition
        Gaussian with at least ``chain_min_std`` so that ``chain_log_prob`` is a proper density (RL)."""

    @abstractmethod
    def chain_log_prob(self, obs: dict[str, Any], chain: torch.Tensor, per_element: bool = False) -> torch.Tensor:
        """Log-density (B, K) of each transition chain[:, k] -> chain[:, k+1] under the stochastic sampler; with
        ``per_element``, the diagonal Gaussian's term of every chunk element, (B, K, horizon, A), which sum to it."""

    @abstractmethod
    def bc_loss(self, obs: dict[str, Any], actions: torch.Tensor) -> torch.Tensor:
        """Supervised denoising / flow-matching loss on expert chunks (B, horizon, A) in env units."""

    # --- executing chunks -------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: dict[str, Any], generator: SamplingGenerator = None) -> np.ndarray:
        chunk = self.sample(obs, generator=generator).actions[:, : self.config.n_action_steps]
        return chunk.clamp(-1.0, 1.0).cpu().numpy()

    def seed_sampling(self, seed: int | None) -> None:
        self._sampling_seed = None if seed is None else int(seed)
        self._episode_generators, self._episode_counts = [], []

    def _episode_generator(self, env_index: int) -> torch.Generator:
        """Env ``env_index``'s generator for its current episode (created on first use)."""
        while len(self._episode_generators) <= env_index:
            self._episode_counts.append(0)
            self._episode_generators.append(episode_generator(self._sampling_seed, len(self._episode_generators), 0))
        return self._episode_generators[env_index]

    def reset(self, env_index: int | None = None) -> None:
        if env_index is None:
            self._history, self._queues = [], []
            self._episode_generators, self._episode_counts = [], []
        else:
            if env_index < len(self._history):
                self._history[env_index].clear()
                self._queues[env_index].clear()
            if self._sampling_seed is not None and env_index < len(self._episode_generators):
                self._episode_counts[env_index] += 1
                self._episode_generators[env_index] = episode_generator(
                    self._sampling_seed, env_index, self._episode_counts[env_index])

    @torch.no_grad()
    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        self.check_observation(obs, has_history=False)
        batch = len(obs[self.config.obs_keys[0]])
        while len(self._history) < batch:
            self._history.append(deque(maxlen=self.config.n_obs_steps))
            self._queues.append(deque())
        for index in range(batch):
            frame = {key: np.asarray(obs[key][index]) for key in self.config.obs_keys}
            history = self._history[index]
            if not history:  # first step of an episode: pad the history with the first observation
                history.extend([frame] * self.config.n_obs_steps)
            else:
                history.append(frame)
        need = [index for index in range(batch) if not self._queues[index]]
        if need:
            stacked = {key: np.stack([np.stack([frame[key] for frame in self._history[index]]) for index in need])
                       for key in self.config.obs_keys}
            if self._sampling_seed is None:
                chunks = self.act(stacked)
            else:
                chunks = self.act(stacked, generator=[self._episode_generator(index) for index in need])
            for row, index in enumerate(need):
                self._queues[index].extend(chunks[row])
        return np.stack([self._queues[index].popleft() for index in range(batch)]).astype(np.float32)


SamplingGenerator = Union[torch.Generator, list[torch.Generator], None]


def episode_generator(seed: int, env_index: int, episode: int) -> torch.Generator:
    """A CPU generator determined by (seed, env index, episode index) alone."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(env_index), int(episode)]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def sampling_noise(shape: tuple[int, ...], device: torch.device, generator: SamplingGenerator = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...): from ``generator``, or row b from ``generator[b]`` when it is
    a list (one generator per batch row, as :meth:`GenerativePolicy.seed_sampling` gives), drawn on the CPU
    when the generator lives there."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=row) for row in generator]).to(device)
    if generator is not None and generator.device.type != torch.device(device).type:
        return torch.randn(shape, generator=generator).to(device)
    return torch.randn(shape, device=device, generator=generator)

"""Training windows for action-chunk policies: an observation history and the action chunk that follows."""

from __future__ import annotations

import numpy as np
import torch

from robofinetune.data.episode import Episode
from robofinetune.errors import DatasetError
from robofinetune.images import is_image_key


class ActionChunkWindows:
    """Every step t of every episode as one sample: observations t-To+1..t and actions t..t+H-1.

    Indices before the episode start repeat the first observation and indices past its end repeat the last
    action (Diffusion Policy's padding), so every step, including the last ones, is a training sample.
    State keys are held as float32; camera keys (``<camera>_image``) stay uint8, in memory and in every batch
    (the policy's encoder converts them on its device), so a batch of images costs a quarter of float32.
    """

    def __init__(self, episodes: list[Episode], obs_keys: list[str], n_obs_steps: int, horizon: int,
                 source: str = "dataset") -> None:
        if not episodes:
            raise DatasetError(f"{source}: no episodes to train on")
        for index, episode in enumerate(episodes):
            missing = [key for key in obs_keys if key not in episode.observations]
            if missing:
                raise DatasetError(f"{source}: episode {index} lacks observation keys {missing}; "
                                   f"it has {episode.obs_keys}")
            episode.validate(f"{source}: episode {index}")
        self.obs_keys = list(obs_keys)
        self.observations = {key: _concatenate([e.observations[key] for e in episodes],
                                               np.uint8 if is_image_key(key) else np.float32)
                             for key in obs_keys}
        self.actions = np.concatenate([e.actions for e in episodes]).astype(np.float32)
        obs_index, action_index = [], []
        start = 0
        for episode in episodes:
            length = len(episode)
            steps = np.arange(length)
            obs_index.append(start + np.clip(steps[:, None] + np.arange(-n_obs_steps + 1, 1)[None], 0, length - 1))
            action_index.append(start + np.clip(steps[:, None] + np.arange(horizon)[None], 0, length - 1))
            start += length
        self.obs_index = np.concatenate(obs_index)
        self.action_index = np.concatenate(action_index)

    def __len__(self) -> int:
        return len(self.obs_index)

    def flat_observations(self) -> np.ndarray:
        """The state keys (all but camera images) of every step, flattened side by side: (N, state_dim)."""
        parts = [self.observations[key].reshape(len(self.actions), -1)
                 for key in self.obs_keys if not is_image_key(key)]
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(self.actions), 0), np.float32)

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        obs = {key: torch.from_numpy(value[self.obs_index[indices]]) for key, value in self.observations.items()}
        return obs, torch.from_numpy(self.actions[self.action_index[indices]])


def _concatenate(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    """One array of all episodes' steps, written straight into ``dtype`` (no temporary float copy of images)."""
    out = np.empty((sum(len(part) for part in parts), *parts[0].shape[1:]), dtype=dtype)
    start = 0
    for part in parts:
        out[start: start + len(part)] = part
        start += len(part)
    return out


class RandomBatches(torch.utils.data.IterableDataset):
    """Yields ``batches_per_epoch`` uniformly drawn batches; gathering with numpy beats per-sample collation."""

    def __init__(self, windows: ActionChunkWindows, batch_size: int, batches_per_epoch: int, seed: int) -> None:
        self.windows, self.batch_size, self.batches_per_epoch, self.seed = windows, batch_size, batches_per_epoch, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        rng = np.random.default_rng([self.seed, self.epoch, rank])
        self.epoch += 1
        for _ in range(self.batches_per_epoch):
            yield self.windows.batch(rng.integers(0, len(self.windows), size=self.batch_size))

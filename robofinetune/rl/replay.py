"""Replay buffer with n-step returns, and the symmetric offline/online sampler of RLPD.

Storage is flat numpy arrays, one row per transition (obs, action, reward, next_obs, terminated). Rows of the
same episode are chained by ``next_index`` (the row of the following step, -1 when there is none yet or the
episode ended), so transitions from several envs may arrive interleaved, one row per env per step, and
still be available for n-step sampling at once. The chain stops at an episode's end: at a *terminal* step
the bootstrap discount is 0; at a *truncated* step (time limit) the return bootstraps from that step's
``next_obs`` with gamma^k. A chain whose next row has not been added yet gives a shorter return that
bootstraps from the last row available, which is an equally valid target.

Each row also carries ``is_intervention``: its action was an operator's (or a scripted intervener's) takeover
rather than the policy's (HIL-SERL). Buffers saved before the field existed load with it False everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robofinetune.data.episode import Episode
from robofinetune.errors import CheckpointError, DatasetError


def flatten_observation(obs: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """Concatenate the task's observation keys into one float32 vector per row: (B, ...) per key -> (B, D)."""
    parts = [np.asarray(obs[key], dtype=np.float32).reshape(len(obs[keys[0]]), -1) for key in keys]
    return np.concatenate(parts, axis=1)


@dataclass
class TransitionBatch:
    """A sampled batch. ``reward`` is the n-step discounted sum r_t + g r_{t+1} + ... and ``discount`` the
    factor in front of the bootstrap value at ``next_obs`` (g^k, or 0 when the episode terminated)."""

    obs: Any
    action: Any
    reward: Any
    discount: Any
    next_obs: Any
    is_intervention: Any = None       # (B,) bool: the row's action was a takeover's; None when not tracked

    def to_torch(self, device: str | torch.device = "cpu") -> "TransitionBatch":
        return TransitionBatch(*(None if getattr(self, f.name) is None else
                                 torch.as_tensor(getattr(self, f.name), device=device) for f in fields(self)))

    @staticmethod
    def concatenate(batches: list["TransitionBatch"]) -> "TransitionBatch":
        def joined(name: str) -> Any:
            parts = [getattr(b, name) for b in batches]
            if any(part is None for part in parts):
                return None
            return np.concatenate(parts)

        return TransitionBatch(*(joined(f.name) for f in fields(TransitionBatch)))

    def __len__(self) -> int:
        return len(self.reward)


class ReplayBuffer:
    """A ring buffer of ``capacity`` transitions of flat observations ``(obs_dim,)`` and actions ``(action_dim,)``.

    ``add_transitions`` takes one row per env (``streams`` says which env, so consecutive steps link up);
    ``add_episode`` takes a whole :class:`Episode`. ``sample(batch, n_step, gamma)`` returns n-step targets.
    ``state_dict()`` / ``load_state_dict()`` (and ``save`` / ``load``) restore it exactly, sampler state included.
    """

    _ARRAYS = ("obs", "action", "reward", "next_obs", "terminated", "next_index", "serial", "is_intervention")
    # arrays a buffer saved by an older version may lack, and the value they take then
    _OPTIONAL_ARRAYS = {"is_intervention": False}

    def __init__(self, obs_dim: int, action_dim: int, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.obs_dim, self.action_dim, self.capacity = int(obs_dim), int(action_dim), int(capacity)
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, action_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.terminated = np.zeros(capacity, bool)
        self.next_index = np.full(capacity, -1, np.int64)
        self.serial = np.full(capacity, -1, np.int64)  # insertion number of the row held in each slot
        self.is_intervention = np.zeros(capacity, bool)
        self.added = 0          # transitions ever added (the next row's serial)
        self.size = 0
        # stream id -> serial of its last row, while that stream's episode is still running
        self._open_streams: dict[int, int] = {}
        self._next_episode_stream = -1  # add_episode uses fresh negative stream ids
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    # --- adding -------------------------------------------------------------------------------------------
    def add_transitions(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray,
                        terminated: np.ndarray, truncated: np.ndarray, streams: np.ndarray | list[int],
                        is_intervention: np.ndarray | None = None) -> np.ndarray:
        """Append rows in order; row i continues the episode last added for ``streams[i]`` unless that one
        ended (terminated or truncated). ``is_intervention`` (default all False) flags takeover actions.
        Returns the slots written."""
        obs = np.asarray(obs, np.float32).reshape(-1, self.obs_dim)
        rows = len(obs)
        action = np.asarray(action, np.float32).reshape(rows, self.action_dim)
        next_obs = np.asarray(next_obs, np.float32).reshape(rows, self.obs_dim)
        reward = np.asarray(reward, np.float32).reshape(rows)
        terminated = np.asarray(terminated, bool).reshape(rows)
        truncated = np.asarray(truncated, bool).reshape(rows)
        streams = np.asarray(streams, np.int64).reshape(rows)
        intervened = np.zeros(rows, bool) if is_intervention is None else np.asarray(is_intervention, bool).reshape(rows)
        serials = self.added + np.arange(rows)
        slots = serials % self.capacity
        self.obs[slots], self.action[slots], self.reward[slots] = obs, action, reward
        self.next_obs[slots], self.terminated[slots] = next_obs, terminated
        self.is_intervention[slots] = intervened
        self.next_index[slots] = -1
        self.serial[slots] = serials
        for row in range(rows):
            stream = int(streams[row])
            previous = self._open_streams.get(stream)
            # link only if the previous row of this stream is still in the buffer (not overwritten)
            if previous is not None and self.serial[previous % self.capacity] == previous:
                self.next_index[previous % self.capacity] = slots[row]
            if terminated[row] or truncated[row]:
                self._open_streams.pop(stream, None)
            else:
                self._open_streams[stream] = int(serials[row])
        self.added += rows
        self.size = min(self.size + rows, self.capacity)
        return slots

    def end_streams(self) -> None:
        """Forget running episodes (after a resume, envs restart): later rows start new chains."""
        self._open_streams.clear()

    def end_stream(self, stream: int) -> None:
        """End ``stream``'s chain here: its next row starts a new one (the end of a takeover copied into the demo
        buffer, whose next steps the policy drove and which that buffer does not hold)."""
        self._open_streams.pop(int(stream), None)

    def add_episode(self, episode: Episode, obs_keys: list[str], extra: np.ndarray | None = None,
                    states: np.ndarray | None = None) -> np.ndarray:
        """Append a whole episode. ``extra`` (T + 1, E) are per-state features appended to the flat
        observations (row t to observation t, row T to the final observation), e.g. the action a frozen base
        policy proposes in each state for residual RL. ``states`` (T + 1, D), when given, replace the flattened
        observation keys (e.g. a frozen encoder's image features: images are never flattened into replay).
        The episode's end stops its chain. Its ``step_data['is_intervention']``, when present (a dataset written
        by a run with interventions), flags rows."""
        length = len(episode)
        if length == 0:
            return np.zeros(0, np.int64)
        missing = [key for key in obs_keys if key not in episode.observations]
        if missing:
            raise DatasetError(f"episode lacks observation keys {missing}; it has {episode.obs_keys}")
        if states is not None:
            states = np.asarray(states, np.float32)
            if states.shape[0] != length + 1:
                raise ValueError(f"states must have T + 1 = {length + 1} rows, got {states.shape[0]}")
            obs, next_obs = states[:-1], states[1:]
        else:
            obs = flatten_observation(episode.observations, obs_keys)
            next_obs = flatten_observation(episode.next_observations(), obs_keys)
        if extra is not None:
            extra = np.asarray(extra, np.float32)
            if extra.shape[0] != length + 1:
                raise ValueError(f"extra must have T + 1 = {length + 1} rows, got {extra.shape[0]}")
            obs = np.concatenate([obs, extra[:-1]], axis=1)
            next_obs = np.concatenate([next_obs, extra[1:]], axis=1)
        truncated = np.zeros(length, bool)
        truncated[-1] = True  # the episode ends here whether or not it terminated
        stream = self._next_episode_stream
        self._next_episode_stream -= 1
        return self.add_transitions(obs, episode.actions, episode.rewards, next_obs, episode.terminals, truncated,
                                    np.full(length, stream), episode.step_data.get("is_intervention"))

    # --- sampling -------------------------------------------------------------------------------------------
    def sample(self, batch_size: int, n_step: int = 1, gamma: float = 0.99) -> TransitionBatch:
        return self.gather(self.sample_slots(batch_size), n_step, gamma)

    def sample_slots(self, batch_size: int) -> np.ndarray:
        """``batch_size`` slots drawn uniformly, with replacement, from the rows held."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return self.rng.integers(0, self.size, size=batch_size)

    def gather(self, slots: np.ndarray, n_step: int = 1, gamma: float = 0.99) -> TransitionBatch:
        """n-step transitions starting at ``slots``: reward sums over up to ``n_step`` rows of the same
        episode, stopping at its end; the bootstrap state is the ``next_obs`` of the last row used."""
        slots = np.asarray(slots, np.int64)
        reward = self.reward[slots].astype(np.float32)
        discount = np.where(self.terminated[slots], 0.0, gamma).astype(np.float32)
        last = slots.copy()
        running = ~self.terminated[slots]
        for _ in range(1, n_step):
            following = self.next_index[last]
            running &= following >= 0
            if not running.any():
                break
            rows = following[running]
            reward[running] += discount[running] * self.reward[rows]
            last[running] = rows
            ended = self.terminated[rows]
            discount[running] = np.where(ended, 0.0, discount[running] * gamma)
            running[running] = ~ended
        return TransitionBatch(self.obs[slots], self.action[slots], reward, discount, self.next_obs[last],
                               self.is_intervention[slots])

    # --- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        used = slice(0, self.size)
        state: dict[str, Any] = {name: getattr(self, name)[used] for name in self._ARRAYS}
        state.update(obs_dim=self.obs_dim, action_dim=self.action_dim, capacity=self.capacity, added=self.added,
                     size=self.size, open_streams=dict(self._open_streams),
                     next_episode_stream=self._next_episode_stream, rng=self.rng.bit_generator.state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a different capacity is fine while the saved buffer never wrapped and fits (e.g. a resumed run whose
        # total_env_steps, and so its default capacity, was changed): rows keep their positions and links
        fits = int(state["added"]) == int(state["size"]) <= self.capacity
        if (int(state["obs_dim"]), int(state["action_dim"])) != (self.obs_dim, self.action_dim) or \
                (int(state["capacity"]) != self.capacity and not fits):
            raise ValueError(f"replay state is for obs_dim {state['obs_dim']}, action_dim {state['action_dim']}, "
                             f"capacity {state['capacity']} ({state['size']} rows); this buffer has {self.obs_dim}, "
                             f"{self.action_dim}, {self.capacity} (config field 'buffer_capacity')")
        self.size, self.added = int(state["size"]), int(state["added"])
        for name in self._ARRAYS:
            # a buffer saved before an optional array existed: every row takes its default (no interventions)
            getattr(self, name)[: self.size] = state[name] if name in state else self._OPTIONAL_ARRAYS[name]
        self._open_streams = {int(k): int(v) for k, v in dict(state["open_streams"]).items()}
        self._next_episode_stream = int(state["next_episode_stream"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]

    def save(self, path: str | Path) -> Path:
        """Write the buffer to ``path`` (.npz) atomically."""
        import json

        path = Path(path)
        state = self.state_dict()
        arrays = {name: state.pop(name) for name in self._ARRAYS}
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(temporary, meta=np.array(json.dumps(state)), **arrays)
        os.replace(temporary, path)
        return path

    def load(self, path: str | Path) -> None:
        """Restore a buffer written by :meth:`save` (a run checkpoint's ``<name>.npz``). A truncated, corrupt or
        mismatched file raises :class:`CheckpointError` naming it."""
        import json

        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                state = json.loads(str(data["meta"]))
                state.update({name: data[name] for name in self._ARRAYS if name in data.files})
        except Exception as error:  # noqa: BLE001 - numpy/zipfile raise BadZipFile, EOFError, OSError, ValueError...
            raise CheckpointError(f"{path}: unreadable replay buffer, truncated or corrupt "
                                  f"({type(error).__name__}: {error})") from error
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: replay buffer does not fit this run ({error})") from error


def symmetric_slots(offline: ReplayBuffer, online: ReplayBuffer, batch_size: int,
                    offline_fraction: float = 0.5) -> list[tuple[ReplayBuffer, np.ndarray]]:
    """The rows RLPD's symmetric sampling takes, as (buffer, slots) pairs: ``offline_fraction`` of the batch
    from the demos, the rest from online data (all from whichever buffer is non-empty when the other is empty).
    For callers that keep per-row data beside the buffers (OGPO's cached next actions)."""
    if len(online) == 0:
        return [(offline, offline.sample_slots(batch_size))]
    if len(offline) == 0:
        return [(online, online.sample_slots(batch_size))]
    offline_rows = int(round(batch_size * offline_fraction))
    return [(buffer, buffer.sample_slots(rows))
            for buffer, rows in ((offline, offline_rows), (online, batch_size - offline_rows)) if rows > 0]


def sample_symmetric(offline: ReplayBuffer, online: ReplayBuffer, batch_size: int, n_step: int = 1,
                     gamma: float = 0.99, offline_fraction: float = 0.5) -> TransitionBatch:
    """RLPD's symmetric sampling (:func:`symmetric_slots`) gathered into one batch of n-step transitions."""
    parts = [buffer.gather(slots, n_step, gamma)
             for buffer, slots in symmetric_slots(offline, online, batch_size, offline_fraction)]
    return parts[0] if len(parts) == 1 else TransitionBatch.concatenate(parts)

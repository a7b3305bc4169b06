"""Shared pieces of the off-policy RL methods (residual, ogpo).

- ``CriticEnsemble(obs_dim, action_dim, num_heads, hidden_dim, depth, layer_norm=True)``: Q heads as one
  batched module, ``critic(obs, action) -> (num_heads, B)``; ``ensemble_min_target(q_heads, subset_size,
  generator)`` (REDQ), ``polyak_update(target, source, tau)``, ``mlp(...)``.
- ``ReplayBuffer(obs_dim, action_dim, capacity, seed)``: flat numpy storage, ``add_transitions`` (one row
  per env), ``add_episode(Episode, obs_keys, extra)``, ``sample(batch, n_step, gamma)`` with n-step returns and
  bootstrap discounts that stop at terminals, ``state_dict``/``load_state_dict``/``save``/``load``;
  ``sample_symmetric(offline, online, batch, ...)`` (RLPD), ``symmetric_slots`` (the rows it takes);
  ``flatten_observation(obs, keys)``.
- ``VectorRollout(envs, reset_hooks)``: steps a SAME_STEP-autoreset vector env, returns transitions whose
  next observation is the true one at episode ends, finished-episode outcomes, resets per-env policy state.
- ``RunLoop(run, total_env_steps, task, ...)``: progress bar, periodic eval, success-curve PNG, checkpoints
  that include the replay buffers, resume.
"""

from robofinetune.rl.critic import (CriticEnsemble, HeadGroups, LoopCriticEnsemble, ensemble_min_target, mlp, polyak_update,
                                   random_head_subset)
from robofinetune.rl.replay import (ReplayBuffer, TransitionBatch, flatten_observation, sample_symmetric,
                                    symmetric_slots)
from robofinetune.rl.rollout import EpisodeOutcome, StepTransitions, VectorRollout
from robofinetune.rl.runloop import RunLoop

__all__ = ["CriticEnsemble", "HeadGroups", "LoopCriticEnsemble", "ensemble_min_target", "random_head_subset", "mlp", "polyak_update", "ReplayBuffer",
           "TransitionBatch", "flatten_observation", "sample_symmetric", "symmetric_slots", "EpisodeOutcome",
           "StepTransitions", "VectorRollout", "RunLoop"]

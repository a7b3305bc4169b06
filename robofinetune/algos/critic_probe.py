"""Can a critic steer a policy? OGPO's critic, measured offline before any actor update.

    log      N episodes of the base's stochastic chain on the task (chunk transitions, episode outcomes)
    train    per critic recipe (an OGPO preset): TD steps as OGPO does them on the first ``train_episodes``
             (+ the demos when the recipe samples them, + success-buffer TD steps when it takes them), the
             policy frozen, so each row's a' ~ pi'(s') is drawn once
    measure  on the held-out episodes' decisions (s, a_logged, the episode's success):
               auc             AUC of Q(s, a_logged) (mean over heads) for the episode's success
               partial_corr    correlation of A = Q(s, a_logged) - V(s) with success, V(s) regressed out of both
                               (V(s) = mean Q over fresh chains at s): does the critic rank a state's chunks,
                               not only tell good states from bad ones?
               group_q_std     std over a state's group of fresh chains of the mean-head Q (what OGPO ranks)
               head_std        std over heads of Q per chain (the disagreement the conservative rule checks)
               active_fraction share of fresh chains the conservative rule leaves a non-zero advantage

    robofinetune ogpo-probe --task=can --critic current=configs/ogpo/can.yaml --critic cpu=configs/ogpo/can_cpu.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from robofinetune.algos.chain_rl import (ChunkedActor, ChunkTransition, chain_of, critic_observation, executed_chunk,
                                         sampling_generator)
from robofinetune.algos.ogpo import (NextActionCache, OGPOConfig, OGPOLearner, conservative_advantage, critic_update,
                                     demo_chunk_transitions, group_relative, load_demos, prepare_policy,
                                     sample_critic_batch, sample_success_batch)
from robofinetune.errors import ConfigError
from robofinetune.rl import ReplayBuffer, VectorRollout


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U / (n1 n0), ties half)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):   # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = 0.5 * (start + end) + 1.0
        start = end + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def partial_correlation(x: np.ndarray, y: np.ndarray, control: np.ndarray) -> float:
    """Correlation of x and y after a least-squares line in ``control`` is taken out of each."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:   # a constant (e.g. every held-out episode succeeded): undefined
        return float("nan")
    design = np.stack([np.ones_like(control), control], axis=1)

    def residual(values: np.ndarray) -> np.ndarray:
        coefficients, *_ = np.linalg.lstsq(design, values, rcond=None)
        return values - design @ coefficients

    rx, ry = residual(np.asarray(x, np.float64)), residual(np.asarray(y, np.float64))
    denominator = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


@dataclass
class LoggedEpisode:
    transitions: list[ChunkTransition]
    success: bool


def log_episodes(config: OGPOConfig, policy, chain_steps: int, episodes: int, num_envs: int,
                 seed: int, progress: bool = True) -> list[LoggedEpisode]:
    """``episodes`` whole episodes of the policy's stochastic chain (raw 0/1 rewards), in the order they end."""
    from robofinetune.envs import make_vector_env

    envs = make_vector_env(config.task, num_envs=num_envs, seed=seed)
    # the policy is on the config's device (prepare_policy); its chain's noise is drawn there
    actor = ChunkedActor(VectorRollout(envs), policy, chain_steps, config.gamma, chain_of(config, chain_steps),
                         generator=sampling_generator(policy.device, seed))
    running: list[list[ChunkTransition]] = [[] for _ in range(num_envs)]
    logged: list[LoggedEpisode] = []
    bar = tqdm(total=episodes, desc="logging the base's episodes", unit="episode", disable=not progress)
    try:
        actor.reset(seed=seed)
        while len(logged) < episodes:
            _, chunks, _ = actor.step()
            for chunk in chunks:
                running[chunk.env_index].append(chunk)
                if chunk.terminated or chunk.truncated:
                    logged.append(LoggedEpisode(running[chunk.env_index], bool(chunk.terminated)))
                    running[chunk.env_index] = []
                    bar.update(min(1, episodes - bar.n))
    finally:
        bar.close()
        envs.close()
    return logged[:episodes]


def _rows(transitions: list[ChunkTransition], config: OGPOConfig) -> dict[str, np.ndarray]:
    """Replay rows of logged transitions with the recipe's reward map: each env step's r -> scale r + offset,
    so a chunk's R -> scale R + offset (1 - gamma^k) / (1 - gamma)."""
    discount = np.array([t.discount for t in transitions])
    steps_sum = (1 - discount) / (1 - config.gamma) if config.gamma < 1 else np.array([t.steps for t in transitions])
    return {"obs": np.stack([t.obs for t in transitions]), "action": np.stack([t.action for t in transitions]),
            "reward": config.reward_scale * np.array([t.reward for t in transitions]) + config.reward_offset * steps_sum,
            "next_obs": np.stack([t.next_obs for t in transitions]),
            "terminated": np.array([t.terminated for t in transitions]),
            "truncated": np.array([t.truncated for t in transitions])}


def _buffer(rows: dict[str, np.ndarray], streams: np.ndarray, seed: int) -> ReplayBuffer:
    buffer = ReplayBuffer(rows["obs"].shape[1], rows["action"].shape[1], max(len(rows["obs"]), 1), seed=seed)
    if len(rows["obs"]):
        buffer.add_transitions(rows["obs"], rows["action"], rows["reward"], rows["next_obs"], rows["terminated"],
                               rows["truncated"], streams)
    return buffer


def train_critic(config: OGPOConfig, policy, chain_steps: int, train: list[LoggedEpisode], td_steps: int,
                 name: str = "", progress: bool = True) -> OGPOLearner:
    """TD steps of ``config``'s critic recipe on the logged training episodes (and demos, success rows)."""
    chain = chain_of(config, chain_steps)
    learner = OGPOLearner(config, policy, chain_steps, chain)
    gamma_chunk = config.gamma ** policy.config.n_action_steps
    transitions = [t for episode in train for t in episode.transitions]
    streams = np.concatenate([np.full(len(e.transitions), i) for i, e in enumerate(train)])
    buffers = {"online": _buffer(_rows(transitions, config), streams, config.seed + 1)}
    demos: list = []
    if config.offline_fraction > 0:
        _, demos = load_demos(config, list(policy.config.obs_keys))
    offline = ReplayBuffer(buffers["online"].obs_dim, buffers["online"].action_dim,
                           max(sum(len(e) for e in demos), 1), seed=config.seed)
    for number, episode in enumerate(demos):   # as train() fills its offline buffer
        rows = demo_chunk_transitions(episode, policy, config.gamma, config.reward_scale, config.reward_offset)
        offline.add_transitions(rows["obs"], rows["action"], rows["reward"], rows["next_obs"], rows["terminated"],
                                rows["truncated"], -(number * policy.config.n_action_steps + rows["stream"]) - 1)
    buffers["offline"] = offline
    successful = [e for e in train if e.success]
    if config.success_td and successful:
        buffers["success"] = _buffer(_rows([t for e in successful for t in e.transitions], config),
                                     np.concatenate([np.full(len(e.transitions), i) for i, e in enumerate(successful)]),
                                     config.seed + 3)
    action_dim = buffers["online"].action_dim
    # the policy is frozen here, so one draw of a' per row is what OGPO's refreshed cache converges to
    caches = {name: NextActionCache(buffer, max(1, config.next_action_samples), action_dim)
              for name, buffer in buffers.items()}
    for name, cache in caches.items():
        cache.fill(np.arange(len(cache.buffer)), learner.sampler, chain_steps, chain=chain,
                   generator=learner.sampling_generator)
    # replay rows stay on the CPU; each TD batch moves to the learner's (the policy's) device
    for _ in tqdm(range(td_steps), desc=f"TD steps ({name})" if name else "TD steps", unit="step",
                  disable=not progress, mininterval=2.0):
        batch, next_actions = sample_critic_batch(buffers["offline"], buffers["online"], caches, config, gamma_chunk,
                                                  learner.device)
        critic_update(learner, batch, next_actions)
        if "success" in buffers:
            batch, next_actions = sample_success_batch(buffers["success"], caches, config, gamma_chunk,
                                                       learner.device)
            critic_update(learner, batch, next_actions)
    return learner


@torch.no_grad()
def measure_critic(learner: OGPOLearner, held_out: list[LoggedEpisode], group_size: int, max_states: int,
                   seed: int) -> dict[str, float]:
    """The probe's measures (module docstring) of a trained critic on held-out decisions."""
    config, policy, device = learner.config, learner.policy, learner.device
    critic = learner.critic_target if config.advantage_critic == "target" else learner.critic
    transitions = [t for e in held_out for t in e.transitions]
    labels = np.concatenate([np.full(len(e.transitions), e.success) for e in held_out])
    obs = torch.from_numpy(np.stack([t.obs for t in transitions])).to(device)
    actions = torch.from_numpy(np.stack([t.action for t in transitions])).to(device)
    logged_q = critic(critic_observation(obs, policy), actions).mean(dim=0).cpu().numpy()
    rows = np.random.default_rng(seed).permutation(len(transitions))[:max_states]
    states = obs[torch.as_tensor(rows, device=device)].repeat_interleave(group_size, dim=0)
    chains = learner.chain.sample(learner.sampler, states, learner.sampling_generator)
    q_heads = critic(critic_observation(states, policy), executed_chunk(chains[:, -1], policy.config.n_action_steps))
    value = q_heads.mean(dim=0).reshape(-1, group_size).mean(dim=1).cpu().numpy()
    advantage = conservative_advantage(group_relative(q_heads, group_size))
    return {"auc": auc(logged_q, labels),
            "partial_corr": partial_correlation(logged_q[rows] - value, labels[rows].astype(float), value),
            "group_q_std": float(q_heads.mean(dim=0).reshape(-1, group_size).std(dim=1).mean()),
            "head_std": float(q_heads.std(dim=0).mean()),
            "active_fraction": float((advantage != 0).float().mean()),
            "held_out_decisions": len(transitions), "probe_states": len(rows)}


def run_probe(task: str, critics: dict[str, str], base: str = "", episodes: int = 120, train_episodes: int = 80,
              td_steps: int = 5000, group_size: int = 8, max_states: int = 400, num_envs: int = 2, seed: int = 0,
              log_config: str | None = None, device: str = "", progress: bool = True) -> dict[str, Any]:
    """Log once with ``log_config``'s chain (default: the first critic's preset), then train and measure each
    critic recipe (name -> preset YAML) on the same episodes. ``device`` (auto, cpu, cuda, cuda:N) overrides the
    presets' (default auto: CUDA when present)."""
    from robofinetune.config import resolve_config

    if not critics:
        raise ConfigError("ogpo-probe: name at least one critic recipe, --critic NAME=PRESET.yaml")
    if not 0 < train_episodes < episodes:
        raise ConfigError(f"ogpo-probe: --train-episodes must be between 0 and --episodes ({episodes}), got {train_episodes}")
    overrides = {"task": task, **({"base": base} if base else {}), **({"device": device} if device else {}),
                 "seed": seed}
    log_with = resolve_config(OGPOConfig, "ogpo", dict(overrides), extra_preset=log_config or next(iter(critics.values())))
    # every critic learns from the same base's episodes: the logging preset's base unless --base says otherwise
    overrides["base"] = log_with.base
    configs = {name: resolve_config(OGPOConfig, "ogpo", dict(overrides), extra_preset=path) for name, path in critics.items()}
    torch.manual_seed(seed)
    started = time.time()
    policy, chain_steps = prepare_policy(log_with)
    policy.eval()
    logged = log_episodes(log_with, policy, chain_steps, episodes, num_envs, seed=300_000 + seed, progress=progress)
    train, held_out = logged[:train_episodes], logged[train_episodes:]
    result: dict[str, Any] = {
        "task": task, "base": log_with.base, "chain": {"steps": chain_steps, "noise": log_with.chain_noise},
        "episodes": {"train": len(train), "held_out": len(held_out),
                     "train_success": float(np.mean([e.success for e in train])),
                     "held_out_success": float(np.mean([e.success for e in held_out]))},
        "td_steps": td_steps, "group_size": group_size, "seed": seed, "device": str(policy.device), "critics": {}}
    for name, config in configs.items():
        torch.manual_seed(seed)
        critic_policy, critic_chain_steps = prepare_policy(config)
        learner = train_critic(config, critic_policy, critic_chain_steps, train, td_steps, name, progress)
        measures = measure_critic(learner, held_out, group_size, max_states, seed)
        result["critics"][name] = {**measures, "preset": critics[name],
                                   "critic": f"{config.num_critics} x {config.critic_depth} x {config.critic_hidden_dim}",
                                   "advantage_critic": config.advantage_critic,
                                   "offline_fraction": config.offline_fraction, "success_td": config.success_td}
    result["wall_clock_s"] = round(time.time() - started, 1)
    return result


def format_probe(result: dict[str, Any]) -> str:
    lines = [f"{result['task']}: {result['episodes']['train']} training / {result['episodes']['held_out']} held-out "
             f"episodes (success {result['episodes']['train_success']:.0%} / {result['episodes']['held_out_success']:.0%}), "
             f"{result['td_steps']} TD steps",
             f"{'critic':<14} {'auc':>6} {'pcorr':>7} {'group_std':>10} {'head_std':>9} {'active':>7}"]
    for name, m in result["critics"].items():
        lines.append(f"{name:<14} {m['auc']:>6.3f} {m['partial_corr']:>7.3f} {m['group_q_std']:>10.4f} "
                     f"{m['head_std']:>9.4f} {m['active_fraction']:>7.1%}")
    lines.append("a critic can steer OGPO when auc is well above 0.5, partial_corr > 0 and group_std exceeds head_std")
    return "\n".join(lines)


def _critic_pair(text: str) -> tuple[str, str]:
    name, equals, path = text.partition("=")
    if not equals or not name or not path:
        raise argparse.ArgumentTypeError(f"--critic takes NAME=PRESET.yaml, got '{text}'")
    return name, path


def add_probe_parser(commands: argparse._SubParsersAction) -> None:
    probe = commands.add_parser("ogpo-probe", help="does a critic rank a policy's chains? (OGPO critic probe)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    probe.add_argument("--task", default="can")
    probe.add_argument("--base", default="", help="policy folder (default: each preset's base)")
    probe.add_argument("--critic", action="append", type=_critic_pair, default=[],
                       help="NAME=PRESET.yaml, an OGPO preset whose critic recipe to probe (repeatable)")
    probe.add_argument("--log-config", help="preset whose chain logs the episodes (default: the first critic's)")
    probe.add_argument("--episodes", type=int, default=120)
    probe.add_argument("--train-episodes", type=int, default=80)
    probe.add_argument("--td-steps", type=int, default=5000)
    probe.add_argument("--group-size", type=int, default=8)
    probe.add_argument("--probe-states", type=int, default=400, help="held-out states that get fresh chains")
    probe.add_argument("--num-envs", type=int, default=2)
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--device", default="", help="auto | cpu | cuda | cuda:N (default: the presets', auto)")
    probe.add_argument("--out", help="write the result as JSON here")
    probe.set_defaults(handler=_command_probe)


def _command_probe(args: argparse.Namespace) -> int:
    # default: the CPU reference recipe's critic (which also logs, with its flow base and tapered chain) beside
    # the critic of the earlier can preset, on the same episodes
    from robofinetune.paths import configs_dir

    critics = dict(args.critic) or {"reference_cpu": str(configs_dir() / "ogpo" / "can_cpu.yaml"),
                                    "current": str(configs_dir() / "ogpo" / "can.yaml")}
    result = run_probe(args.task, critics, base=args.base, episodes=args.episodes,
                       train_episodes=args.train_episodes, td_steps=args.td_steps, group_size=args.group_size,
                       max_states=args.probe_states, num_envs=args.num_envs, seed=args.seed,
                       log_config=args.log_config, device=args.device)
    print(format_probe(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0

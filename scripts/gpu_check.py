"""One short check of every CUDA path of the project, timed: run it on a GPU machine when one is lent.

    python scripts/gpu_check.py                      # device auto (CUDA when present), full sizes, < 8 min on one H200
    python scripts/gpu_check.py --device=cpu --quick  # the same code on the CPU at small sizes (< 1 min): it runs

Sections (each runs even if an earlier one failed; a failure is recorded with its traceback and the exit code is 1):

    bc        ``train bc`` (Lightning, accelerator = the device) on pointmass demos collected here, --bc-steps steps
    residual  ``train residual`` on pointmass from that BC policy with ``device`` = the device, --residual-steps env
              steps; and the time of one can-size residual update (10 critics of 2 x 128, batch 256, n-step rows,
              every 2nd update also the actor) on the device and on the CPU
    ogpo      actor and TD steps at ``configs/ogpo/can_reference.yaml`` sizes on the device from policies/can/weak_flow:
              one actor step on 256 states x 32 chains (K = 10, EMA target actor, per-chain ratio, BC on a success
              buffer), one TD step of 10 heads of 4 x 512 on 256 rows with a' sampled inside it; the reference does one
              actor step and two TD steps (replay + success buffer) per env step, so that sum is the learner's cost
              per env step, and x 1M the projected learner time of a 1M-step run (env stepping not included)
    sampling  latency of one action chunk (``policy.act`` at batch 1, the deployed sampler) of the shipped
              policies/can/strong_diffusion and strong_flow, on the CPU and on the device

Prints a table and writes ``gpu_check.json`` into ``$OUT`` (or the working folder), or to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- timing ----------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``step`` over ``repeats`` calls after ``warmup`` (CUDA work is waited for each time)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def devices_to_compare(device: torch.device) -> list[torch.device]:
    """The CPU and the device under test (just the CPU when that is the device)."""
    return [torch.device("cpu")] + ([device] if device.type != "cpu" else [])


# --- sections --------------------------------------------------------------------------------------------------

def pointmass_demos(path: Path, episodes: int) -> Path:
    """Scripted pointmass demos at ``path`` (in the run's temporary folder, not datasets/)."""
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import save_dataset

    save_dataset(collect_episodes("pointmass", episodes, source="scripted", seed=1, progress=False), path,
                 env_meta={"env_name": "pointmass", "task": "pointmass"})
    return path


def check_bc(device: torch.device, folder: Path, demos: Path, steps: int) -> dict[str, Any]:
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.runs import Run

    config = BCConfig(task="pointmass", policy="diffusion", dataset=str(demos), max_steps=steps, batch_size=256,
                      warmup_steps=min(100, steps), eval_episodes=0, checkpoint_every=10**9, seed=0,
                      accelerator="gpu" if device.type == "cuda" else "cpu")
    started = time.perf_counter()
    summary = train_bc(config, Run.create("bc", "pointmass", config, root=folder / "runs"), progress=False)
    from robofinetune.policies import load_policy

    load_policy(summary["policy_path"], device=device)   # the exported checkpoint loads onto the device
    return {"policy_path": summary["policy_path"], "train_steps": summary["train_steps"],
            "train_seconds": summary["train_seconds"], "wall_s": time.perf_counter() - started,
            "ms_per_step": 1000 * summary["train_seconds"] / max(summary["train_steps"], 1),
            "accelerator": config.accelerator, "network": f"{config.depth} x {config.hidden_dim} MLP",
            "batch": config.batch_size}


def check_residual_run(device: torch.device, folder: Path, demos: Path, base: str, env_steps: int) -> dict[str, Any]:
    from robofinetune.algos.residual import ResidualConfig, train
    from robofinetune.runs import Run

    config = ResidualConfig(task="pointmass", base=base, dataset=str(demos), device=str(device), seed=0,
                            total_env_steps=env_steps, warmup_steps=env_steps // 3, eval_every=0,
                            final_eval_episodes=4, eval_envs=1, checkpoint_every=env_steps, log_every=env_steps,
                            progress=False)
    run = Run.create("residual", "pointmass", config, root=folder / "runs")
    started = time.perf_counter()
    summary = train(config, run)
    run.close()
    state = torch.load(run.path / "checkpoints" / "latest" / "state.pt", weights_only=False)
    wall = time.perf_counter() - started
    # env steps/s of the training loop (summary's wall clock), without the set-up and the two evaluations
    return {"env_steps": summary["env_steps"], "wall_s": wall, "loop_s": summary["wall_clock_s"],
            "env_steps_per_s": summary["env_steps"] / max(summary["wall_clock_s"], 1e-9),
            "final_success": summary.get("final_success"),
            "checkpoint_tensor_devices": sorted({t.device.type for t in tensors_in(state)})}


def tensors_in(value: Any):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def check_residual_update(device: torch.device, repeats: int) -> dict[str, Any]:
    """One residual update (critic; every 2nd also the actor) at can's sizes, the CPU and the device."""
    from robofinetune.algos.residual import ResidualActor, ResidualConfig, ResidualLearner, td3_update
    from robofinetune.envs import load_task_spec
    from robofinetune.rl import TransitionBatch

    spec = load_task_spec("can")
    config = ResidualConfig(task="can")
    action_dim, batch_size = spec.action_dim, config.batch_size
    rl_obs_dim = spec.obs_dim + action_dim
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(batch_size, rl_obs_dim, generator=generator).clamp(-1, 1),
            torch.rand(batch_size, action_dim, generator=generator) * 2 - 1,
            torch.rand(batch_size, generator=generator),
            torch.full((batch_size,), config.gamma ** config.n_step),
            torch.randn(batch_size, rl_obs_dim, generator=generator).clamp(-1, 1)]
    result: dict[str, Any] = {"critics": f"{config.num_critics} x {config.critic_depth} x {config.critic_hidden_dim}",
                              "batch": batch_size, "ms_per_update": {}}
    for where in devices_to_compare(device):
        torch.manual_seed(0)
        actor = ResidualActor(spec.obs_dim, action_dim, config.actor_hidden_dim, config.actor_depth,
                              config.layer_norm, config.action_scale).to(where)
        learner = ResidualLearner(config, actor)
        batch = TransitionBatch(*rows).to_torch(where)
        count = [0]

        def update() -> None:
            count[0] += 1
            td3_update(learner, batch, update_actor=count[0] % config.actor_update_every == 0)

        result["ms_per_update"][where.type] = 1000 * median_seconds(update, where, repeats)
    return result


def check_ogpo(device: torch.device, quick: bool, repeats: int) -> dict[str, Any]:
    """Actor and TD steps at can_reference.yaml's sizes (quick: fewer states, chains and rows), on ``device``."""
    from robofinetune.algos.chain_rl import SuccessBuffer, chain_of
    from robofinetune.algos.ogpo import OGPOConfig, OGPOLearner, critic_update, ogpo_actor_update, prepare_policy
    from robofinetune.config import resolve_config
    from robofinetune.data.episode import Episode
    from robofinetune.paths import configs_dir
    from robofinetune.rl import TransitionBatch

    scale = {"actor_states": 16, "group_size": 8, "actor_minibatch": 128, "critic_batch_size": 64} if quick else {}
    config = resolve_config(OGPOConfig, "ogpo", {"device": str(device), **scale},
                            extra_preset=configs_dir() / "ogpo" / "can_reference.yaml")
    torch.manual_seed(0)
    policy, chain_steps = prepare_policy(config)
    learner = OGPOLearner(config, policy, chain_steps, chain=chain_of(config, chain_steps))
    spec = policy.config
    generator = np.random.default_rng(0)

    def states(count: int) -> np.ndarray:
        """Flat observation histories inside the base's observation range."""
        low, high = policy.obs_normalizer.low.cpu().numpy(), policy.obs_normalizer.high.cpu().numpy()
        frames = generator.uniform(low, high, (count, spec.n_obs_steps, spec.obs_dim)).astype(np.float32)
        return frames.reshape(count, -1)

    # a success buffer with one (synthetic) 200-step episode, so the actor step pays its BC term as the reference's
    success = SuccessBuffer(policy, 10_000, seed=0)
    frames = states(201).reshape(201, spec.n_obs_steps, spec.obs_dim)[:, -1]
    keys, offset, observations = list(spec.obs_keys), 0, {}
    for key in keys:
        size = int(np.prod(spec.obs_shapes[key]))
        observations[key] = frames[:, offset: offset + size].reshape(201, *spec.obs_shapes[key])
        offset += size
    success.add_episode(Episode({key: value[:200] for key, value in observations.items()},
                                generator.uniform(-1, 1, (200, spec.action_dim)).astype(np.float32), success=True,
                                final_observation={key: value[200] for key, value in observations.items()}))
    action_dim = spec.n_action_steps * spec.action_dim
    rows = config.critic_batch_size
    batch = TransitionBatch(torch.from_numpy(states(rows)), torch.rand(rows, action_dim) * 2 - 1,
                            torch.rand(rows) - 1.0, torch.full((rows,), config.gamma ** spec.n_action_steps),
                            torch.from_numpy(states(rows))).to_torch(device)
    actor_states = torch.from_numpy(states(config.actor_states))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    actor_s = median_seconds(lambda: ogpo_actor_update(learner, actor_states, success), device, repeats, warmup=1)
    td_s = median_seconds(lambda: critic_update(learner, batch), device, repeats, warmup=1)
    per_env_step = actor_s + 2 * td_s    # utd_pi 1; utd_q 1 plus the success-buffer TD step
    result = {"sizes": {"actor_states": config.actor_states, "group_size": config.group_size,
                        "chains_per_actor_step": config.actor_states * config.group_size, "chain_steps": chain_steps,
                        "critic": f"{config.num_critics} x {config.critic_depth} x {config.critic_hidden_dim}",
                        "critic_batch": rows, "next_action_cache": config.next_action_cache},
              "actor_step_ms": 1000 * actor_s, "td_step_ms": 1000 * td_s,
              "learner_ms_per_env_step": 1000 * per_env_step,
              "projected_learner_hours_1M_env_steps": per_env_step * 1e6 / 3600,
              "parameters_on": sorted({p.device.type for p in learner.parameters()}),
              "noise_generator_on": learner.sampling_generator.device.type}
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def check_sampling(device: torch.device, repeats: int) -> dict[str, Any]:
    """ms per action chunk at batch 1 (the deployed sampler, observation history as an env gives it)."""
    from robofinetune.paths import policies_dir
    from robofinetune.policies import load_policy

    result: dict[str, Any] = {}
    for name in ("strong_diffusion", "strong_flow"):
        entry: dict[str, Any] = {"ms_per_chunk": {}}
        for where in devices_to_compare(device):
            policy = load_policy(policies_dir() / "can" / name, device=where)
            config = policy.config
            obs = {key: np.zeros((1, config.n_obs_steps, *config.obs_shapes[key]), np.float32)
                   for key in config.obs_keys}
            entry["ms_per_chunk"][where.type] = 1000 * median_seconds(lambda: policy.act(obs), where, repeats)
            entry.update(kind=policy.kind, steps=config.inference_steps, chunk=config.n_action_steps)
        result[name] = entry
    return result


# --- the run ------------------------------------------------------------------------------------------------------

def table(result: dict[str, Any]) -> str:
    """One row per figure: its value on the CPU and on the device (one column when the device is the CPU)."""
    sections, device = result["sections"], torch.device(result["device"])
    on_cpu = device.type == "cpu"
    columns = ["cpu"] if on_cpu else ["cpu", str(device)]
    width = 58
    lines = [f"{'check':<{width}}" + "".join(f"{name:>12}" for name in columns)]

    def row(label: str, cpu: float | None = None, dev: float | None = None) -> None:
        values = [cpu] if on_cpu else [cpu, dev]
        lines.append(f"{label:<{width}}" + "".join(f"{'-' if v is None else f'{v:.2f}':>12}" for v in values))

    def here(value: float) -> tuple[float | None, float | None]:
        """A figure measured on the device only, in its column."""
        return (value, None) if on_cpu else (None, value)

    if "bc" in sections:
        bc = sections["bc"]
        row(f"bc: ms per Lightning step ({bc['network']}, batch {bc['batch']})", *here(bc["ms_per_step"]))
    if "residual_run" in sections:
        run = sections["residual_run"]
        row(f"residual: pointmass env steps/s in the loop ({run['env_steps']} steps)", *here(run["env_steps_per_s"]))
    if "residual_update" in sections:
        update = sections["residual_update"]
        row(f"residual: ms per can update ({update['critics']}, batch {update['batch']})",
            update["ms_per_update"].get("cpu"), update["ms_per_update"].get(device.type))
    if "ogpo" in sections:
        ogpo, sizes = sections["ogpo"], sections["ogpo"]["sizes"]
        for key, label in (("actor_step_ms", f"ogpo: ms per actor step ({sizes['chains_per_actor_step']} chains)"),
                           ("td_step_ms", f"ogpo: ms per TD step ({sizes['critic']}, batch {sizes['critic_batch']})"),
                           ("learner_ms_per_env_step", "ogpo: learner ms per env step (1 actor + 2 TD steps)"),
                           ("projected_learner_hours_1M_env_steps", "ogpo: learner hours for 1M env steps")):
            row(label, *here(ogpo[key]))
    for name, entry in sections.get("sampling", {}).items():
        row(f"sampling: ms per chunk at batch 1, can {name}", entry["ms_per_chunk"].get("cpu"),
            entry["ms_per_chunk"].get(device.type))
    for name, error in result["errors"].items():
        lines.append(f"FAILED {name}: {error.strip().splitlines()[-1]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    parser.add_argument("--quick", action="store_true", help="small sizes: proves the script runs (CPU < 1 min)")
    parser.add_argument("--out", help="JSON path (default $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--only", nargs="*", default=["bc", "residual", "ogpo", "sampling"],
                        help="sections to run (bc residual ogpo sampling)")
    args = parser.parse_args()

    from robofinetune.algos.chain_rl import resolve_chain_device

    device = resolve_chain_device(args.device)
    quick = args.quick
    sizes = {"bc_steps": 20 if quick else 300, "residual_env_steps": 150 if quick else 300,
             "demos": 20 if quick else 50, "update_repeats": 3 if quick else 20, "ogpo_repeats": 2 if quick else 5,
             "sampling_repeats": 3 if quick else 50}
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or ".") / "gpu_check.json"
    result: dict[str, Any] = {"device": str(device), "quick": quick, "sizes": sizes, "torch": torch.__version__,
                              "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "sections": {}, "errors": {}, "seconds": {}}
    started = time.perf_counter()

    def section(name: str, work: Callable[[], dict[str, Any]]) -> None:
        began = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            result["sections"][name] = work()
        except Exception:   # record and go on: one broken path must not hide the others' numbers
            result["errors"][name] = traceback.format_exc()
            print(result["errors"][name], file=sys.stderr, flush=True)
        result["seconds"][name] = round(time.perf_counter() - began, 1)
        print(f"[gpu_check] {name}: {result['seconds'][name]} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temporary:
        folder = Path(temporary)
        demos = folder / "pointmass_demos.hdf5"
        if {"bc", "residual"} & set(args.only):
            # residual needs a pointmass base: the BC section's policy, so --only residual runs bc too
            section("demos", lambda: {"path": str(pointmass_demos(demos, sizes["demos"]))})
            if "demos" in result["sections"]:
                section("bc", lambda: check_bc(device, folder, demos, sizes["bc_steps"]))
        if "residual" in args.only:
            if "bc" in result["sections"]:
                section("residual_run", lambda: check_residual_run(device, folder, demos,
                                                                   result["sections"]["bc"]["policy_path"],
                                                                   sizes["residual_env_steps"]))
            section("residual_update", lambda: check_residual_update(device, sizes["update_repeats"]))
        if "ogpo" in args.only:
            section("ogpo", lambda: check_ogpo(device, quick, sizes["ogpo_repeats"]))
        if "sampling" in args.only:
            section("sampling", lambda: check_sampling(device, sizes["sampling_repeats"]))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(table(result))
    print(f"wall clock {result['wall_s']} s; wrote {out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

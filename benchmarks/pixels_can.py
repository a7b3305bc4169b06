"""Pixels on can: what rendering costs under each camera setting, and image BC success from pixels only.

    python benchmarks/pixels_can.py --render-only            # render cost table (~3 min)
    python benchmarks/pixels_can.py --diffusion=runs/<bc run>/policy [--flow=...] [--weak=...]

The policies come from ``robofinetune train bc --config=configs/bc/can_image.yaml`` (``--policy=flow`` for flow);
their training wall clock is read from the checkpoint. Each is evaluated on ``can_image`` over ``--episodes``
episodes (eval seeds from 100000, as every benchmark here); latency is per action chunk at batch 1 on one
thread; dataset size is the image dataset written as robomimic HDF5 (gzip), zarr and LeRobot v3 (mp4 video).
Writes benchmarks/results/pixels_can.json; its top level holds ``image_bc`` (the diffusion policy's figures)
and ``render_ms_per_step`` ({setting: ms}).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from common import RESULTS, cached_evaluation, eval_curve, provenance, write_result

IMAGE_RESIDUAL_TARGET_POINTS = 20   # issue 17: at least +20 points over the weak image base
FAST = dict(shadows=False, reflections=False, skybox=False, haze=False, multisamples=0)


def render_settings() -> dict[str, tuple[str, dict]]:
    """setting name -> (base task, TaskSpec overrides)."""
    from robofinetune.envs import load_task_spec
    from robofinetune.envs.spec import Camera, RenderSettings

    can_image = load_task_spec("can_image")
    state = {key: shape for key, shape in can_image.obs_shapes.items() if not key.endswith("_image")}

    def cameras(size: int, names=("agentview", "robot0_eye_in_hand")) -> dict:
        shapes = dict(state)
        for name in names:
            shapes[f"{name}_image"] = (size, size, 3)
        return {"cameras": [Camera(name, size, size) for name in names], "obs_shapes": shapes}

    return {
        "can_no_cameras": ("can", {}),
        "can_2cams_84_robosuite_default": ("can_image", {**cameras(84), "render_settings": RenderSettings()}),
        "can_2cams_84_no_shadows_reflections_skybox_haze": (
            "can_image", {**cameras(84), "render_settings": RenderSettings(**{**FAST, "multisamples": None})}),
        "can_2cams_84_fast (shipped can_image)": ("can_image", {}),
        "can_2cams_64_fast": ("can_image", {**cameras(64), "render_settings": RenderSettings(**FAST)}),
        "can_2cams_128_fast": ("can_image", {**cameras(128), "render_settings": RenderSettings(**FAST)}),
        "can_agentview_84_fast": ("can_image", {**cameras(84, ("agentview",)), "render_settings": RenderSettings(**FAST)}),
        "can_eye_in_hand_84_fast": (
            "can_image", {**cameras(84, ("robot0_eye_in_hand",)), "render_settings": RenderSettings(**FAST)}),
        "pointmass_image_32": ("pointmass_image", {}),
    }


def _measure_setting(name: str, steps: int) -> tuple[float, dict[str, float]]:
    """(median ms per env step, per-camera std of the last frame) for one setting, in this process."""
    from robofinetune.envs import load_task_spec, make_env

    task, overrides = render_settings()[name]
    spec = load_task_spec(task)
    spec = spec.replace(**overrides) if overrides else spec
    env = make_env(spec)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        action = rng.uniform(-0.3, 0.3, env.action_space.shape).astype(np.float32)
        start = time.perf_counter()
        obs, _, terminated, truncated, _ = env.step(action)
        times.append((time.perf_counter() - start) * 1000)
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return float(np.median(times[5:])), {key: float(value.std()) for key, value in obs.items() if key.endswith("_image")}


def render_ms_per_step(steps: int) -> dict[str, float]:
    """Median ms per env step (physics and rendering every camera) over ``steps`` random-action steps, one env,
    each setting in a fresh process: several robosuite envs with different render settings made one after the
    other in one process once gave a black wrist camera (and a cheap, wrong time); a blank frame fails here."""
    import multiprocessing

    figures = {}
    context = multiprocessing.get_context("spawn")
    for name in render_settings():
        with context.Pool(1) as pool:
            ms, image_std = pool.apply(_measure_setting, (name, steps))
        blank = [key for key, std in image_std.items() if std < 5.0]
        if blank:
            raise RuntimeError(f"render setting {name}: blank frames from {blank} (std {image_std})")
        figures[name] = ms
        print(f"render {name}: {ms:.1f} ms per step")
    return figures


def chunk_latency_ms(policy, repeats: int = 30) -> float:
    """Median ms per action chunk at batch 1 on one thread (images uint8, as an env gives them)."""
    obs = {key: np.zeros((1, policy.config.n_obs_steps, *shape),
                         np.uint8 if key.endswith("_image") else np.float32)
           for key, shape in policy.config.obs_shapes.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    with torch.no_grad():
        for index in range(repeats + 3):
            start = time.perf_counter()
            policy.sample(obs)
            if index >= 3:
                times.append((time.perf_counter() - start) * 1000)
    torch.set_num_threads(threads)
    return float(np.median(times))


def evaluate(policy_path: str, episodes: int) -> dict:
    from robofinetune.policies import load_policy

    policy = load_policy(policy_path, device="cpu")
    # same policy, episodes and seeds: reuse rather than re-spend ~15 CPU minutes
    evaluation = cached_evaluation(policy, "can_image", episodes, 100_000,
                                   Path(policy_path) / f"eval_can_image_{episodes}_seed100000.json")
    print(f"{policy_path}: {evaluation.summary()}")
    meta = policy.checkpoint_metadata
    image_keys = [key for key in policy.config.obs_shapes if key.endswith("_image")]
    return {
        "policy_path": policy_path, "policy": policy.config.kind if hasattr(policy.config, "kind") else meta.get("policy"),
        "success": evaluation.success_rate, "success_ci": list(evaluation.success_ci), "episodes": evaluation.episodes,
        "mean_length": evaluation.mean_length,
        "cameras": [key[: -len("_image")] for key in image_keys],
        "image_size": list(policy.config.obs_shapes[image_keys[0]][:2]) if image_keys else None,
        "state_keys": [key for key in policy.config.obs_shapes if not key.endswith("_image")],
        **training_totals(meta),
        "latency_ms_per_chunk": chunk_latency_ms(policy),
    }


def training_totals(meta: dict) -> dict:
    """Training steps and seconds of a policy and of the policies it was started from (``--init-policy``)."""
    from robofinetune.algos.bc import initial_training

    prior = {key: meta[key] for key in ("init_policy", "prior_train_steps", "prior_train_seconds") if key in meta}
    run_config = Path(meta.get("run", "")) / "config.yaml"
    if not prior and run_config.is_file():   # a run trained before its card recorded the lineage
        init_policy = (yaml.safe_load(run_config.read_text()) or {}).get("init_policy")
        prior = initial_training(init_policy) if init_policy else {}
    steps, seconds = meta.get("train_steps"), meta.get("train_seconds")
    if not prior or steps is None or seconds is None:
        return {"train_seconds": seconds, "train_steps": steps}
    return {"train_seconds": seconds + prior["prior_train_seconds"], "train_steps": steps + prior["prior_train_steps"],
            "started_from": prior["init_policy"], "this_run_train_seconds": seconds, "this_run_train_steps": steps}


def dataset_sizes(dataset: Path) -> dict[str, float]:
    """MB on disk of the image dataset in each format (the HDF5 as given; zarr and LeRobot written from it)."""
    from robofinetune.data.io import convert_dataset

    def size_mb(path: Path) -> float:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return sum(p.stat().st_size for p in files) / 1e6

    sizes = {"robomimic_hdf5": size_mb(dataset)}
    with tempfile.TemporaryDirectory() as folder:
        for name, destination in (("zarr", Path(folder) / "data.zarr"), ("lerobot_v3_mp4", Path(folder) / "data_lerobot")):
            start = time.perf_counter()
            convert_dataset(dataset, destination)
            sizes[name] = size_mb(destination)
            sizes[f"{name}_write_seconds"] = time.perf_counter() - start
            shutil.rmtree(destination, ignore_errors=True)
    print(f"dataset sizes (MB): {sizes}")
    return sizes


def image_distill_summary(path: Path) -> dict:
    """``image_distill`` from a ``benchmarks/distill_can.py --task=can_image`` result (its first teacher)."""
    distill = json.loads(path.read_text())
    name, entry = next(iter(distill["teachers"].items()))
    success = entry["success"]
    return {"teacher": name, "teacher_path": entry["teacher_path"], "student_path": entry["student_path"],
            "teacher_success": success["teacher"]["success"], "teacher_success_ci": success["teacher"]["success_ci"],
            "student_success": success["student_1"]["success"], "student_success_ci": success["student_1"]["success_ci"],
            "episodes": success["student_1"]["episodes"],
            "gap_points": entry["teacher_minus_student_1"]["points"],
            "gap_ci_points": entry["teacher_minus_student_1"]["ci_points"],
            "latency_ratio": entry["latency_ratio_teacher10_over_student1"],
            "latency_ms_batch1": entry["latency_ms_batch1"],
            "distill": entry["distill"], "measured_by": {key: distill.get(key) for key in ("command", "commit", "date")},
            "source": str(path)}


def twin_agreement_summary(path: Path) -> dict:
    """``twin_agreement`` from a ``benchmarks/robot_twin.py --robot=real_robot/can_image_twin.yaml`` result."""
    twin = json.loads(path.read_text())
    agreement = twin["agreement"]
    sim, ros = agreement["in_process"]["same_seeds"], agreement["deploy_over_ros"]
    return {"policy": twin["policy"], "robot": twin["robot"],
            "in_process_success": sim["success_rate"], "in_process_success_ci": sim["success_ci"],
            "ros_success": ros["success_rate"], "ros_success_ci": ros["success_ci"], "episodes": ros["episodes"],
            "intervals_overlap": agreement["same_seeds_vs_deploy"]["intervals_overlap"],
            "two_proportion_p": agreement["same_seeds_vs_deploy"]["two_proportion_p"],
            "latency_ms_p50": ros["latency_ms"]["p50"], "latency_ms_p99": ros["latency_ms"]["p99"],
            "latency_ms_sampling_steps": ros.get("latency_ms_sampling_steps"),
            "rate_hz_mean": ros["rate_hz_mean"], "target_rate_hz": ros["target_rate_hz"],
            "camera_rate_rostopic_hz": ros.get("camera_rate_rostopic_hz"),
            "control_loop": twin.get("control_loop"),
            "measured_by": {key: twin.get(key) for key in ("command", "commit", "date")}, "source": str(path)}


def image_residual_summary(run_path: Path) -> dict:
    """``image_residual`` from a finished ``robofinetune train residual --task=can_image`` run folder. A run started
    with ``--eval_base=false`` has no base point of its own: the base's success is then its card's stored
    100-episode evaluation (same evaluation seeds), and ``base_source`` says so."""
    summary = json.loads((run_path / "summary.json").read_text())
    config = yaml.safe_load((run_path / "config.yaml").read_text())
    base_success, base_ci, base_source = summary["base_success"], summary["base_success_ci"], "the run's own evaluation"
    if base_success is None:
        card_eval = Path(config["base"]) / f"eval_{config['task']}_{config['final_eval_episodes']}.json"
        stored = json.loads(card_eval.read_text())
        base_success, base_ci, base_source = stored["success_rate"], stored["success_ci"], str(card_eval)
    records = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    rates = [record["perf/env_steps_per_s"] for record in records if "perf/env_steps_per_s" in record]
    gain_points = round(100 * (summary["final_success"] - base_success), 1)
    bytes_per_transition = summary["replay_bytes_per_transition"]
    return {"run": str(run_path), "base": config["base"],
            "base_success": base_success, "base_success_ci": base_ci, "base_source": base_source,
            "final_success": summary["final_success"], "final_success_ci": summary["final_success_ci"],
            "episodes": summary["eval_episodes"], "env_steps": summary["env_steps"],
            "gain_points": gain_points, "target_gain_points": IMAGE_RESIDUAL_TARGET_POINTS,
            "meets_target": gain_points >= IMAGE_RESIDUAL_TARGET_POINTS,
            "env_steps_per_s_median": statistics.median(rates) if rates else None,
            "wall_clock_s": summary["wall_clock_s"], "replay_features": summary["replay_features"],
            "replay_bytes_per_transition": bytes_per_transition,
            "replay_mib_at_100k": round(bytes_per_transition * 100_000 / 2**20, 1),
            "curve": eval_curve(run_path), "seed": summary["seed"]}


def trained_encoder_cost(policy_path: str, batch_size: int = 256, updates_per_step: float = 2.0,
                         repeats: int = 8) -> dict:
    """What ResFiT's other design would cost here: a critic that trains the image encoder (random-shift
    augmentation on) instead of reading the frozen base's cached features. Per critic update the encoder runs
    forward and backward on the batch's observations (both cameras) and forward on the next observations for the
    target; measured on one thread (the learner's) with a copy of the base's own encoder, and projected onto the
    measured learner of the frozen-feature run (``env_steps_per_s`` there) at ``updates_per_step``."""
    import copy

    from robofinetune.policies import load_policy
    from robofinetune.rl.features import observation_encoder_of

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = copy.deepcopy(observation_encoder_of(load_policy(policy_path, device="cpu"))).train()
        optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-4)
        generator = torch.Generator().manual_seed(0)
        observation = {key: (torch.randint(0, 256, (batch_size, 1, *shape), generator=generator, dtype=torch.uint8)
                             if len(shape) == 3 else torch.randn(batch_size, 1, *shape, generator=generator))
                       for key, shape in encoder.shapes.items()}
        forward_backward, forward = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            loss = encoder(observation).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            forward_backward.append(time.perf_counter() - started)
            started = time.perf_counter()
            with torch.no_grad():
                encoder(observation)
            forward.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    update_s = statistics.median(forward_backward[1:]) + statistics.median(forward[1:])
    return {"batch_size": batch_size, "cameras": sum(1 for shape in encoder.shapes.values() if len(shape) == 3),
            "encoder_forward_backward_ms": round(1000 * statistics.median(forward_backward[1:]), 1),
            "encoder_forward_ms": round(1000 * statistics.median(forward[1:]), 1),
            "added_ms_per_critic_update": round(1000 * update_s, 1), "updates_per_env_step": updates_per_step,
            "threads": 1}


def feature_probe(policy_path: str, image_dataset: Path, state_dataset: Path, demos: int = 80,
                  train_demos: int = 55) -> dict:
    """How much of the can's position the frozen encoder features (what the image residual's actor and critic see)
    carry: a ridge regression from features to the can's position, absolute and relative to the gripper, fitted
    on ``train_demos`` demos and scored (R^2 per axis) on the rest of the first ``demos``, against proprioception
    alone. The image dataset is the state one converted, demo for demo, so the state file gives the can's pose."""
    import h5py

    from robofinetune.policies import load_policy
    from robofinetune.rl.features import BASE_ENCODER, FrozenFeatures, observation_encoder_of

    encoder = observation_encoder_of(load_policy(policy_path, device="cpu"))
    features = FrozenFeatures(BASE_ENCODER, list(encoder.shapes), encoder)
    rows: dict[str, list[np.ndarray]] = {"features": [], "can": [], "proprio": [], "demo": []}
    with h5py.File(image_dataset, "r") as images, h5py.File(state_dataset, "r") as states:
        for index in range(demos):
            frames, state = images[f"data/demo_{index}/obs"], states[f"data/demo_{index}/obs"]
            observation = {key: frames[key][:] for key in encoder.shapes}
            count = len(state["object"])
            rows["features"].append(np.concatenate([features({key: value[start: start + 256] for key, value in
                                                               observation.items()}) for start in range(0, count, 256)]))
            rows["can"].append(state["object"][:, :3])
            rows["proprio"].append(np.concatenate([state["robot0_eef_pos"][:], state["robot0_gripper_qpos"][:]], 1))
            rows["demo"].append(np.full(count, index))
    inputs, can, proprio, demo = (np.concatenate(rows[key]) for key in ("features", "can", "proprio", "demo"))
    train = demo < train_demos

    def held_out_r2(x: np.ndarray, y: np.ndarray) -> list[float]:
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        z = np.c_[(x - mean) / std, np.ones(len(x))]
        weights = np.linalg.solve(z[train].T @ z[train] + 1e-2 * np.eye(z.shape[1]), z[train].T @ y[train])
        error = ((z[~train] @ weights - y[~train]) ** 2).sum(0)
        return [round(float(value), 3) for value in 1 - error / ((y[~train] - y[~train].mean(0)) ** 2).sum(0)]

    relative = can - proprio[:, :3]
    return {"policy": policy_path, "frames": int(len(inputs)), "feature_dim": int(inputs.shape[1]),
            "demos_fit": train_demos, "demos_scored": demos - train_demos,
            "can_xyz_r2": {"features": held_out_r2(inputs, can), "proprioception": held_out_r2(proprio, can)},
            "can_minus_gripper_xyz_r2": {"features": held_out_r2(inputs, relative),
                                         "proprioception": held_out_r2(proprio, relative)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--diffusion", help="image diffusion BC policy folder")
    parser.add_argument("--flow", help="image flow BC policy folder (optional)")
    parser.add_argument("--weak", help="the deliberately weak image policy shipped for part 2 (optional)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                        help="more policies to evaluate the same way, kept under 'variants' (e.g. the same weights "
                             "executing 2 of each chunk's actions)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--weak-episodes", type=int, default=100)
    parser.add_argument("--render-steps", type=int, default=60)
    parser.add_argument("--dataset", default="datasets/can_image_200.hdf5")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--keep-variants", action="store_true",
                        help="carry over the last result's variants that this run does not evaluate again (their "
                             "policy folders may be gone), each with the invocation that measured it")
    parser.add_argument("--previous-as", metavar="NAME",
                        help="keep the last result's image_bc as variant NAME (when --diffusion is a longer run of it)")
    parser.add_argument("--skip-sizes", action="store_true", help="keep dataset_mb from the last result")
    parser.add_argument("--skip-render", action="store_true", help="keep render_ms_per_step from the last result")
    parser.add_argument("--distill-result", type=Path,
                        help="benchmarks/results/distill_can_image.json (python benchmarks/distill_can.py "
                             "--task=can_image ...): becomes image_distill")
    parser.add_argument("--twin-result", type=Path,
                        help="the robot_twin.py result for real_robot/can_image_twin.yaml: becomes twin_agreement")
    parser.add_argument("--residual-run", type=Path,
                        help="a finished `robofinetune train residual --task=can_image` run folder: becomes "
                             "image_residual")
    parser.add_argument("--residual-invocation", action="append", default=[], metavar="COMMAND",
                        help="with --residual-run: a command that made the run (repeat, in order), kept in "
                             "image_residual.invocations")
    parser.add_argument("--residual-note", default="", help="with --residual-run: image_residual.note")
    parser.add_argument("--feature-probe", metavar="POLICY",
                        help="an image policy (e.g. policies/can/weak_image_diffusion): how well its frozen features "
                             "locate the can (held-out R^2), into image_residual.feature_probe")
    parser.add_argument("--encoder-cost", metavar="POLICY",
                        help="an image policy: the per-update cost of training its encoder in the critic (ResFiT's "
                             "design) on one thread, projected onto the frozen-feature run; into "
                             "image_residual.trained_encoder_cost")
    parser.add_argument("--state-dataset", default="datasets/can_scripted_200.hdf5",
                        help="--feature-probe: the state demos --dataset was converted from")
    parser.add_argument("--summaries-only", action="store_true",
                        help="measure nothing: keep the last result and (re)read --distill-result / --twin-result / "
                             "--residual-run")
    args = parser.parse_args()
    if args.summaries_only:
        args.render_only = args.skip_render = True

    previous_path = RESULTS / "pixels_can.json"
    previous = json.loads(previous_path.read_text()) if previous_path.exists() else {}
    result = {"task": "can_image", **provenance(0)}
    result["render_ms_per_step"] = (previous.get("render_ms_per_step", {}) if args.skip_render
                                    else render_ms_per_step(args.render_steps))
    if not args.render_only:
        if not args.diffusion:
            parser.error("--diffusion is required unless --render-only")
        result["image_bc"] = evaluate(args.diffusion, args.episodes)
        if args.flow:
            result["image_bc_flow"] = evaluate(args.flow, args.episodes)
        if args.weak:
            result["weak_image_policy"] = evaluate(args.weak, args.weak_episodes)
        measured_by = {key: previous.get(key) for key in ("command", "commit", "date")}
        if args.keep_variants:
            for name, variant in previous.get("variants", {}).items():
                result.setdefault("variants", {})[name] = {"measured_by": measured_by, **variant}
        if args.previous_as and "image_bc" in previous:
            result.setdefault("variants", {})[args.previous_as] = {"measured_by": measured_by, **previous["image_bc"]}
        for entry in args.variant:
            name, _, path = entry.partition("=")
            result.setdefault("variants", {})[name] = evaluate(path, args.episodes)
        if args.skip_sizes:
            if "dataset_mb" in previous:
                result["dataset_mb"] = previous["dataset_mb"]
        elif Path(args.dataset).is_file():
            result["dataset_mb"] = dataset_sizes(Path(args.dataset))
    else:
        for key in ("image_bc", "image_bc_flow", "weak_image_policy", "variants", "dataset_mb"):
            if key in previous:
                result[key] = previous[key]
        if "image_bc" in previous:   # say which invocation measured what was carried over
            result["image_bc_measured_by"] = previous.get("image_bc_measured_by") or {
                key: previous.get(key) for key in ("command", "commit", "date")}
    # part 2's figures come from their own benchmarks; a run that does not pass them keeps the last ones
    for key, source, summarise in (("image_distill", args.distill_result, image_distill_summary),
                                   ("twin_agreement", args.twin_result, twin_agreement_summary)):
        if source is not None:
            result[key] = summarise(source)
        elif key in previous:
            result[key] = previous[key]
    if args.residual_run is not None:
        result["image_residual"] = image_residual_summary(args.residual_run)
        if args.residual_invocation:
            result["image_residual"]["invocations"] = args.residual_invocation
        if args.residual_note:
            result["image_residual"]["note"] = args.residual_note
    elif "image_residual" in previous:
        result["image_residual"] = previous["image_residual"]
    if args.feature_probe:
        result.setdefault("image_residual", {})["feature_probe"] = feature_probe(
            args.feature_probe, Path(args.dataset), Path(args.state_dataset))
    elif "feature_probe" in previous.get("image_residual", {}):
        result.setdefault("image_residual", {})["feature_probe"] = previous["image_residual"]["feature_probe"]
    if args.encoder_cost:
        cost = trained_encoder_cost(args.encoder_cost)
        frozen_rate = result.get("image_residual", {}).get("env_steps_per_s_median")
        if frozen_rate:   # each env step now also pays the encoder in every one of its critic updates
            seconds_per_step = 1 / frozen_rate + cost["updates_per_env_step"] * cost["added_ms_per_critic_update"] / 1000
            cost["projected_env_steps_per_s"] = round(1 / seconds_per_step, 2)
            cost["projected_hours_per_100k_env_steps"] = round(100_000 * seconds_per_step / 3600, 1)
        result.setdefault("image_residual", {})["trained_encoder_cost"] = cost
        print(f"trained encoder: {cost}")
    elif "trained_encoder_cost" in previous.get("image_residual", {}):
        result.setdefault("image_residual", {})["trained_encoder_cost"] = previous["image_residual"]["trained_encoder_cost"]
    write_result("pixels_can.json", result)


if __name__ == "__main__":
    main()

"""Policy checkpoints: a folder with ``model.safetensors`` (weights and normaliser statistics) and
``policy.json`` (policy kind, its config, free-form metadata such as the command that made it)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from safetensors.torch import load_model, save_model

from robofinetune.errors import CheckpointError
from robofinetune.images import image_keys, is_image_key
from robofinetune.policies.base import Policy

CHECKPOINT_FORMAT = "robofinetune-policy/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "policy.json"

_REGISTRY: dict[str, tuple[type[Policy], type]] = {}
# Policy kinds defined outside robofinetune.policies register themselves when their module is imported;
# load_policy imports it on demand, so `robofinetune eval --policy=<run>/policy` works for them too.
_KIND_MODULES = {"residual": "robofinetune.algos.residual"}


def register_policy(kind: str, policy_class: type[Policy], config_class: type) -> None:
    """Make ``load_policy`` able to rebuild ``policy_class`` from a checkpoint whose kind is ``kind``."""
    _REGISTRY[kind] = (policy_class, config_class)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def config_from_dict(config_class: type, values: dict[str, Any], source: str) -> Any:
    known = {field.name for field in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{source}: unknown policy config fields {unknown} for {config_class.__name__}")
    return config_class(**values)


def save_policy(policy: Policy, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint folder atomically (a temporary folder renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(temporary, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        if hasattr(policy, "save_extra"):
            policy.save_extra(temporary)  # composite policies write their sub-policies here
        save_model(policy, str(temporary / WEIGHTS_FILE))
        document = {"format": CHECKPOINT_FORMAT, "kind": policy.kind, "config": policy.config.to_dict(),
                    "metadata": metadata or {}}
        (temporary / CONFIG_FILE).write_text(json.dumps(document, indent=2, default=str))
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            os.replace(temporary, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path


def read_policy_document(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no such policy checkpoint")
    if not config_path.exists():
        raise CheckpointError(f"{path}: not a policy checkpoint (missing {CONFIG_FILE})")
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: corrupt JSON ({error})") from error
    if document.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{config_path}: field 'format' is {document.get('format')!r}, "
                              f"expected {CHECKPOINT_FORMAT!r}")
    return document


def load_policy(path: str | Path, device: str | torch.device | None = None, task: str | None = None) -> Policy:
    """Rebuild a policy from its checkpoint folder, in eval mode, on CUDA when present (else CPU).

    ``task`` (optional) must match the task the checkpoint was trained for.
    """
    import robofinetune.policies  # noqa: F401  (registers the built-in policy kinds)

    path = Path(path)
    document = read_policy_document(path)
    kind = document.get("kind")
    if kind not in _REGISTRY and kind in _KIND_MODULES:
        import importlib

        importlib.import_module(_KIND_MODULES[kind])
    if kind not in _REGISTRY:
        raise CheckpointError(f"{path / CONFIG_FILE}: field 'kind' is {kind!r}; known kinds: {sorted(_REGISTRY)}")
    policy_class, config_class = _REGISTRY[kind]
    config = config_from_dict(config_class, document["config"], str(path / CONFIG_FILE))
    if task is not None and config.task != task:
        raise CheckpointError(f"{path}: checkpoint was trained for task '{config.task}', not '{task}'")
    if hasattr(policy_class, "load_extra"):
        policy = policy_class.load_extra(path, config)
    else:
        policy = policy_class(config)
    try:
        missing, unexpected = load_model(policy, str(path / WEIGHTS_FILE), strict=False)
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}") from error
    except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path / WEIGHTS_FILE}: unreadable weights ({error})") from error
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: weights do not match the config: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    policy.checkpoint_metadata = document.get("metadata", {})
    return policy.to(torch.device(device) if device is not None else default_device()).eval()


def check_policy_matches_env(policy: Policy, env: gym.Env | gym.vector.VectorEnv, source: str = "policy") -> None:
    """Raise CheckpointError naming the key when the policy's observation/action layout differs from the env's.

    For a policy with cameras that covers the camera set (every camera it was trained on must be there; extra
    cameras of the env are ignored) and each image's size: an image encoder only takes the size it was trained on.
    """
    observation_space = getattr(env, "single_observation_space", env.observation_space)
    action_space = getattr(env, "single_action_space", env.action_space)
    config = policy.config
    env_cameras = image_keys(observation_space.spaces)
    for key in config.obs_keys:
        if key not in observation_space.spaces:
            if is_image_key(key):
                raise CheckpointError(f"{source}: was trained on camera image '{key}' (cameras {config.image_keys}), "
                                      f"which the env does not provide (env cameras: {env_cameras})")
            raise CheckpointError(f"{source}: needs observation '{key}' which the env does not provide "
                                  f"(env keys: {list(observation_space.spaces)})")
        env_shape = tuple(observation_space.spaces[key].shape)
        if env_shape != tuple(config.obs_shapes[key]):
            what = "camera image" if is_image_key(key) else "observation"
            raise CheckpointError(f"{source}: {what} '{key}' is {tuple(config.obs_shapes[key])} in the checkpoint "
                                  f"but {env_shape} in the env")
    if action_space.shape[-1] != config.action_dim:
        raise CheckpointError(f"{source}: action_dim {config.action_dim} but the env takes {action_space.shape[-1]}")

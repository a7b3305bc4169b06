"""Policies: the generative BC policies (diffusion, flow) and the checkpoint format they all share."""

from robofinetune.policies.base import ChainSample, GenerativePolicy, Policy, PolicyConfig
from robofinetune.policies.checkpoint import (check_policy_matches_env, load_policy, register_policy,
                                              save_policy)
from robofinetune.policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig
from robofinetune.policies.flow import FlowPolicy, FlowPolicyConfig

register_policy("diffusion", DiffusionPolicy, DiffusionPolicyConfig)
register_policy("flow", FlowPolicy, FlowPolicyConfig)
import robofinetune.policies.consistency  # noqa: E402,F401  (registers the one-step student kind "consistency")

POLICY_TYPES = {"diffusion": (DiffusionPolicy, DiffusionPolicyConfig), "flow": (FlowPolicy, FlowPolicyConfig)}

__all__ = ["ChainSample", "GenerativePolicy", "Policy", "PolicyConfig", "DiffusionPolicy", "DiffusionPolicyConfig",
           "FlowPolicy", "FlowPolicyConfig", "load_policy", "save_policy", "register_policy",
           "check_policy_matches_env", "POLICY_TYPES"]

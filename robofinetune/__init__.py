"""robofinetune: keep a behaviour-cloned generative policy frozen and make it better, faster and safer.

The life of one policy: demos -> ``train bc`` -> ``train residual`` / ``train ogpo`` -> ``distill`` ->
``gate`` -> ``eval`` -> ``deploy``. Each stage is a subpackage; the seams between them are three small
interfaces: :func:`robofinetune.envs.make_env`, :class:`robofinetune.data.Episode` and
:class:`robofinetune.policies.Policy`.
"""

__version__ = "0.1.0"

#: Modules that register a :class:`robofinetune.envs.spec.TaskSource` (other files that stand for a task);
#: ``robofinetune.envs`` imports them on the first YAML path it is asked about, and imports nothing else of theirs.
TASK_SOURCE_MODULES = ("robofinetune.robot.config",)  # robot YAMLs (real_robot/*.yaml) mirror a sim task

"""robofinetune: keep a behaviour-cloned generative policy frozen and make it better, faster and safer.

The life of one policy: demos -> ``train bc`` -> ``train residual`` / ``train ogpo`` -> ``distill`` ->
``gate`` -> ``eval`` -> ``deploy``. Each stage is a subpackage; the seams between them are three small
interfaces: :func:`robofinetune.envs.make_env`, :class:`robofinetune.data.Episode` and
:class:`robofinetune.policies.Policy`.
"""

__version__ = "0.1.0"

"""The actor half of residual RL on hardware: a Ray actor on the robot's computer that drives the robot at its
control rate and hands replay rows to a learner elsewhere (a GPU box), which sends weights back.

Why a separate actor. A robot cannot wait for a learner: a loop that pauses for a gradient step, a network hiccup
or a learner restart leaves the arm holding stale commands mid-motion. So :class:`RobotActor` owns the robot
(a :class:`~robofinetune.robot.env.RobotEnv`, its safety layer and an optional teleop operator; or any task's env,
for tests and dry runs, optionally with the task's scripted expert as the intervener), the frozen base and the
residual actor, and runs the control loop in a thread of its own that never waits for the learner:

- it acts with :class:`~robofinetune.rl.residual_acting.ResidualActing`, the step ``train residual`` and the Ray
  policy workers use, so its rows are the same replay rows, each tagged with the weights version it acted with;
- rows go into a bounded outbox; the learner drains it with a non-blocking call. A full outbox drops its oldest
  rows (the newest were collected with the newest weights) and counts them, rather than slowing the loop;
- weights come through :class:`~robofinetune.distributed.weights.WeightBroadcaster` /
  :class:`~robofinetune.distributed.weights.WeightSubscriber`; a helper thread fetches them, so the loop only
  swaps them in between two steps. A learner that is gone or slow leaves the loop acting with the last weights
  it got (before any weights: the base with ResFiT's warm-up noise); the safety layer is untouched by all this;
- a step the robot aborts (its observations stopped; the watchdog held it) gives no row; a robot that will not
  start an episode (e-stop engaged, no observations) is asked again every second, and the stats say why;
- takeovers (``teleop``: an operator on the robot's computer; ``intervener='scripted'``: the simulated task's
  expert) happen here, in the loop: the env is wrapped in
  :class:`~robofinetune.rl.interventions.InterventionWrapper` (built by
  :func:`~robofinetune.rl.interventions.make_training_envs`, as in the in-process ``train residual``), which asks
  the operator (polls the teleop source and keys) before every step. A row's action is then the executed one and
  its last array the ``is_intervention`` flag, and each finished episode's outcome counts its intervened steps and
  takeovers, exactly as the in-process loop's rows and outcomes, so the learner stores and counts them the same
  way. An operator's takeover never waits for the learner.

The learner's side is :class:`RobotActorLink`. The actor is a named, detached Ray actor, so a learner that
crashes or restarts attaches to it again by name (:meth:`RobotActorLink.attach`) while the robot keeps going.
Delivery is at most once: a drain removes the rows it returns, so no row is handed out twice, and a new link
gets the rows not yet drained (rows of a drain whose reply never reached a dying learner are lost, not resent).
Every row carries a sequence number; a batch whose first row does not follow the row delivered before it
(rows dropped, the loop restarted its episode, another learner drained in between) says so, so the learner ends
its replay chain there instead of joining unrelated steps into one n-step return.

One learner at a time. Two learners on one actor would each take the weights over from the other, so an attach
is refused while another learner holds the actor. A learner holds it from its attach until it detaches (a learner
that fails or is interrupted detaches on its way out) or until it has not been heard from for ``learner_lease_s``
(default 30 s): its link sends a heartbeat every quarter of that and every drain counts too, so a learner busy
learning or checkpointing keeps it, and one whose process or machine died without detaching counts as gone once
the lease runs out (a ``--resume`` right after such a crash is refused for at most that long). ``takeover=True``
attaches anyway; the learner that held the actor is refused on its next drain. :class:`RobotActorHandle` (and
``robofinetune robot-actor status|stop --name=NAME``) reads the stats or stops the actor without attaching.

The operator's stop. A teleop operator's stop key (or e-stop) at the robot ends the actor's loop after that step,
as it ends an in-process run: the robot holds (a realtime one is sent its hold command), the stats say
``stop_requested``, and a learner's drain, once it has taken every row acted before the stop, sets
:attr:`RobotActorLink.stop_requested` instead of failing, so ``train residual`` ends the run as an in-process stop
does (checkpoint, summary, the actor stopped unless ``robot_actor_keep_running``). The loop does not start again:
stop the actor (``robofinetune robot-actor stop``) and start a new run.

Placement: on the robot's computer, not wherever Ray finds a free CPU. Start the cluster with a custom resource
on the robot PC and ask for it::

    # GPU box (the learner):
    ray start --head --port=6379
    # robot PC (ROS master reachable, ROS_MASTER_URI set in this shell):
    ray start --address=<gpu-box-ip>:6379 --resources='{"robot": 1}'
    # then, on the GPU box: RobotActorLink.start(spec, resources={"robot": 1}, ray_address="auto")

or pin it to a node by id (``node_id=``, from ``ray list nodes``). Ray 2.60's ``ray start --head`` checks a token:
copy the head's ``~/.ray/auth_token`` to the robot PC and set ``RAY_AUTH_MODE=token`` there
(:mod:`robofinetune.distributed.cluster`).

Stats (:meth:`RobotActorLink.stats`, :class:`RobotActorStats`): steps, the achieved rate and loop period
percentiles over the last ``stats_window`` steps, the weights version in use and its age, rows waiting,
delivered and dropped, the attached learner and when it was last heard from, and whether the operator stopped it.

Wiring into ``train residual``: ``--robot-actor``::

    robofinetune train residual --task=real_robot/<robot>.yaml --robot-actor --robot_resource=robot --ray-address=auto

The learner (:func:`robofinetune.algos.residual.train`) steps no env: it attaches to the running actor named
``robot_actor_name`` (default ``residual-<task name>``, kept in the run's config.yaml) or starts one with the
base, actor shape, features, noise, warm-up and seed the in-process loop would use, pinned to the Ray resource
``robot_resource``; publishes its weights, then drains rows, stores them as the ``--rollout-in-workers`` branch
stores its workers' batches and learns, ``updates_per_step`` per row, each row one env step; the actor gets the
weights every ``weights_every`` updates. A learner that fails or is interrupted leaves the actor acting with its
last weights; ``--resume=<run>`` reattaches by name and gets the rows acted meanwhile (a resumed learner's update
count can be below the version the actor acts with: their staleness counts as 0). At the end of the budget, or
when the operator stops the loop at the robot, the actor stops (``robot_actor_keep_running`` detaches instead).
``robot_actor_takeover`` attaches while another learner holds the actor. No evaluation runs: evaluation episodes
on the task would open a second connection to the robot the actor drives, so the run logs the actor's own training
episodes (``train/episode_success``, exploration noise included) every ``eval_every`` env steps, summary.json keeps
``base_success``/``final_success`` null and says why (evaluate with ``robofinetune deploy``); ``--gate``, an
off-policy evaluation on logged data, runs as usual. ``intervener``/``teleop`` (and the scripted intervener's
settings) go to the actor, whose loop runs the takeovers; the learner stores the flagged rows and logs the
intervention counters as the in-process loop does (no ``episodes.hdf5``: the actor sends replay rows, not
observations; a robot without a success topic, whose episodes wait for the operator's mark, is refused). Not
with ``rollout_in_workers``, ``num_env_workers``, ``episodes_format`` or more than one env.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robofinetune import logs
from robofinetune.distributed.cluster import import_ray, init_ray
from robofinetune.distributed.policy_workers import DEFAULT_START_TIMEOUT_S, RolloutBatch, worker_seeds
from robofinetune.distributed.ray_envs import restore_worker_logs, start_error
from robofinetune.distributed.weights import WeightBroadcaster, WeightSubscriber, load_numpy_state
from robofinetune.errors import ConfigError, RobofinetuneError

#: The namespace robot actors are named in, so any learner (any Ray job) can find them.
DEFAULT_NAMESPACE = "robofinetune"
#: The robot actor serves drains, stats and weight subscriptions while its loop thread runs: threads, not one
#: call at a time.
ACTOR_CONCURRENCY = 4
#: Seconds between attempts to start a fresh episode after a robot error (no observations, e-stop engaged).
ROBOT_RETRY_S = 1.0


class RobotActorError(RobofinetuneError):
    """The robot actor could not be started, found, or reached, or its control loop stopped on an error."""


class RobotActorInUse(RobotActorError):
    """Another learner holds the robot actor (one learner at a time); ``lease_s``: how long a silent holder keeps it."""

    def __init__(self, message: str, lease_s: float) -> None:
        super().__init__(message)
        self.lease_s = lease_s


@dataclass
class RobotActorSpec:
    """What the robot actor runs. ``task``: a robot YAML (``real_robot/<robot>.yaml``: a ``RobotEnv``) or any
    task name (a simulated env, for tests and dry runs). ``base``: the frozen base's folder. ``actor_kwargs``:
    :class:`~robofinetune.algos.residual.ResidualActor`'s constructor arguments, ``feature_kind`` what it sees of
    a frame (:mod:`robofinetune.rl.features`).

    ``control_rate`` (Hz): None takes a robot YAML's own ``control_rate`` (which must be written there: a robot
    driver expects one rate, a guessed default is not safe) or a simulated task's ``control_freq``; a value
    overrides either. A robot paces itself (its ``sync`` mode); a simulated env is paced here.

    ``warmup_steps``: the loop acts with the base plus uniform ``warmup_noise`` for this many steps, and until the
    first weights arrive. ``outbox_rows``: rows kept for the learner before the oldest are dropped.
    ``teleop``: an operator who may take over (keyboard | spacemouse | ros-topic; robots only). ``intervener``:
    ``"scripted"``, the simulated task's scripted expert takes over on a stall, with ``scripted`` the fields of a
    :class:`~robofinetune.rl.interventions.ScriptedInterventionConfig` ({}: its defaults); ``"none"``: no one.
    ``overrides``: ``make_env``'s (a robot YAML's dotted fields, or a sim task's, e.g. ``horizon``).
    ``environment``: variables set in the actor's process before the env starts (``ROS_MASTER_URI``, ``ROS_IP``
    when the Ray node was started without them). ``learner_lease_s``: an attached learner not heard from for this
    long counts as gone, and another may attach (module docstring).
    """

    task: str
    base: str
    actor_kwargs: dict[str, Any]
    feature_kind: str = "state"
    control_rate: float | None = None
    exploration_noise: float = 0.05
    warmup_noise: float = 0.1
    warmup_steps: int = 0
    seed: int = 0
    outbox_rows: int = 10_000
    stats_window: int = 200
    weights_poll_s: float = 0.05
    teleop: str = ""
    intervener: str = "none"
    scripted: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    learner_lease_s: float = 30.0

    def check(self) -> RobotActorSpec:
        if self.control_rate is not None and not self.control_rate > 0:
            raise ConfigError(f"robot actor: control_rate must be > 0 Hz, got {self.control_rate}")
        for name in ("outbox_rows", "stats_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"robot actor: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.weights_poll_s <= 0 or self.learner_lease_s <= 0:
            raise ConfigError("robot actor: warmup_steps must be >= 0, weights_poll_s and learner_lease_s > 0")
        from robofinetune.rl.interventions import INTERVENERS, ScriptedInterventionConfig

        if self.intervener not in INTERVENERS:
            raise ConfigError(f"robot actor: intervener is {self.intervener!r}; choose one of {list(INTERVENERS)}")
        if self.teleop and self.intervener != "none":
            raise ConfigError("robot actor: teleop and intervener both set: the operator (teleop) or the scripted "
                              "expert (intervener) takes over, not both")
        ScriptedInterventionConfig(**self.scripted).check()
        return self

    def policy_differences(self, other: RobotActorSpec) -> list[str]:
        """The fields that decide what the actor's rows and weights are (task, base, actor shape, features, who
        may take over and how) on which ``other`` (a running actor's spec) differs from this one: a learner with
        different ones cannot use its rows (or would store intervened rows it has no room or settings for), nor
        can the actor load its weights."""
        defaults = {name: spec.default_factory() if spec.default_factory is not MISSING else spec.default
                    for name, spec in RobotActorSpec.__dataclass_fields__.items()}
        # a running actor started before a field existed has its default
        return [name for name in ("task", "base", "actor_kwargs", "feature_kind", "intervener", "teleop", "scripted")
                if (_local_path(getattr(self, name)) if name in ("task", "base") else getattr(self, name))
                != getattr(other, name, defaults[name])]


@dataclass
class RobotActorStats:
    """How the robot actor's loop is doing (rates and periods over the last ``window`` steps)."""

    steps: int
    episodes: int
    target_rate_hz: float
    achieved_rate_hz: float
    period_ms_p50: float | None
    period_ms_p99: float | None
    window: int
    weights_version: int            # -1: no weights received yet (warm-up)
    seconds_since_weights: float | None
    rows_waiting: int
    rows_delivered: int
    rows_dropped: int
    running: bool
    error: str | None               # why the loop stopped (it does not restart by itself)
    robot_error: str | None         # the last robot error the loop is recovering from (None once it stepped again)
    weights_error: str | None       # the last failure to fetch weights (learner gone); cleared by the next weights
    safety_interventions: int       # the safety layer's changes to commands this episode (robots)
    aborted_steps: int              # steps the robot aborted (no fresh observations): no rows
    incarnation: str
    pid: int
    # defaults: stats from an actor started before these fields existed
    stop_requested: bool = False    # the operator asked to stop at the robot: the loop ended, the robot holds
    learner: str | None = None      # the attached learner (host, process id); None: none holds the actor
    learner_heard_s: float | None = None   # seconds since the attached learner was last heard from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _OutboxEntry:
    seq: int
    version: int
    row: tuple[np.ndarray, ...]
    finished: list[Any]
    starts_chain: bool   # it follows no earlier row (the loop restarted its episode, or the robot aborted a step)


class RowOutbox:
    """The rows waiting for the learner: bounded, oldest dropped first, each numbered, at most once delivered."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: deque[_OutboxEntry] = deque()
        self._lock = threading.Lock()
        self.next_seq = 0
        self.delivered = 0
        self.dropped = 0

    def put(self, version: int, row: tuple[np.ndarray, ...], finished: list[Any], starts_chain: bool) -> None:
        with self._lock:
            if len(self._entries) >= self.capacity:
                self._entries.popleft()
                self.dropped += 1
            self._entries.append(_OutboxEntry(self.next_seq, version, row, finished, starts_chain))
            self.next_seq += 1

    def take(self, max_rows: int) -> list[_OutboxEntry]:
        """Remove and return up to ``max_rows`` of the oldest rows, stopping before a row that starts a new chain
        (so a batch breaks the replay chain at its first row at most)."""
        with self._lock:
            taken: list[_OutboxEntry] = []
            while self._entries and len(taken) < max_rows:
                if taken and self._entries[0].starts_chain:
                    break
                taken.append(self._entries.popleft())
            self.delivered += len(taken)
            return taken

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class RobotActor:
    """Ray actor on the robot's machine: the env, base + residual acting and the free-running control loop
    (module docstring). Made through :class:`RobotActorLink`, not directly."""

    def __init__(self, spec: RobotActorSpec, log_settings: dict[str, str | None]) -> None:
        os.environ.update(spec.environment)   # before rospy reads ROS_MASTER_URI
        restore_worker_logs(log_settings)
        import torch

        from robofinetune.algos.residual import ResidualActor
        from robofinetune.envs import load_task_spec
        from robofinetune.rl import VectorRollout
        from robofinetune.rl.features import FrozenFeatures, observation_encoder_of
        from robofinetune.rl.residual_acting import ResidualActing
        from robofinetune.rl.setup import load_base_policy

        torch.set_num_threads(1)   # a small MLP per step: one core, as Ray reserved
        self.spec = spec.check()
        self.incarnation = uuid.uuid4().hex
        self.is_robot, self.target_rate, overrides = _control_rate(spec)
        self.envs, self.operator = _make_envs(spec, overrides, self.is_robot)
        self.base = load_base_policy(spec.base, spec.task).requires_grad_(False).eval()
        self.features = FrozenFeatures(spec.feature_kind, list(load_task_spec(spec.task).obs_keys),
                                       observation_encoder_of(self.base))
        self.actor = ResidualActor(**spec.actor_kwargs).requires_grad_(False)
        self.acting = ResidualActing(VectorRollout(self.envs), self.base, self.actor, self.features,
                                     np.random.default_rng(worker_seeds(spec.seed, 0, 0)[2]),
                                     spec.exploration_noise, spec.warmup_noise)
        self.outbox = RowOutbox(spec.outbox_rows)
        self._subscriber: WeightSubscriber | None = None   # until a learner's link subscribes
        self._subscriber_lock = threading.Lock()
        self._new_weights: tuple[int, dict[str, np.ndarray]] | None = None   # fetched, not yet loaded by the loop
        self._weights_lock = threading.Lock()
        self.version = -1
        self._weights_at: float | None = None
        self.steps = 0
        self.episodes = 0
        self.aborted_steps = 0   # steps the robot aborted (no fresh observations): not sent as rows
        self._ticks: deque[float] = deque(maxlen=spec.stats_window + 1)
        self._stats_lock = threading.Lock()
        self.error: str | None = None
        self.robot_error: str | None = None
        self.weights_error: str | None = None
        self.stop_requested = False   # the operator's stop at the robot ended the loop
        # the attached learner: its link's id, where it runs, and when it was last heard from (time.monotonic)
        self._learner: str | None = None
        self._learner_label: str | None = None
        self._learner_heard = 0.0
        self._learner_lock = threading.Lock()
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._run_loop, name="robot-control-loop", daemon=True)
        self._fetcher = threading.Thread(target=self._fetch_weights, name="robot-weights", daemon=True)
        self._loop.start()
        self._fetcher.start()

    # --- calls from the learner (Ray's threads, beside the loop) ----------------------------------------------

    def identity(self) -> tuple[str, int, str]:
        """(incarnation, process id, Ray node id)."""
        import ray

        return self.incarnation, os.getpid(), ray.get_runtime_context().get_node_id()

    def describe(self) -> RobotActorSpec:
        """The spec this actor was started with (paths as the learner that started it resolved them)."""
        return self.spec

    def subscribe(self, weight_store: Any, learner: str, label: str, takeover: bool = False) -> dict[str, Any]:
        """Attach the learner ``learner`` (its link's id; ``label`` says where it runs): take weights from its
        store from now on, the loop keeping its current weights until it publishes. Refused while another learner
        holds the actor (attached, not detached, heard from within ``learner_lease_s``) unless ``takeover``.
        Returns ``refused`` (None, or the holder's ``learner`` label and ``heard_s``) and ``lease_s``."""
        with self._learner_lock:
            holder_heard_s = time.monotonic() - self._learner_heard
            if (self._learner not in (None, learner) and holder_heard_s < self.spec.learner_lease_s
                    and not takeover):
                return {"refused": {"learner": self._learner_label, "heard_s": holder_heard_s},
                        "lease_s": self.spec.learner_lease_s}
            self._learner, self._learner_label, self._learner_heard = learner, label, time.monotonic()
            with self._subscriber_lock:
                self._subscriber = WeightSubscriber(weight_store)
        return {"refused": None, "lease_s": self.spec.learner_lease_s}

    def heartbeat(self, learner: str) -> bool:
        """The learner ``learner`` is alive; False when it no longer holds the actor (another took it over)."""
        return self._heard_from(learner)

    def release(self, learner: str) -> None:
        """The learner ``learner`` detached: another may attach at once (a no-op when it no longer holds it)."""
        with self._learner_lock:
            if self._learner == learner:
                self._learner, self._learner_label = None, None

    def _heard_from(self, learner: str) -> bool:
        with self._learner_lock:
            if self._learner != learner:
                return False
            self._learner_heard = time.monotonic()
            return True

    def drain(self, max_rows: int, learner: str | None = None) -> dict[str, Any] | None:
        """Remove and return up to ``max_rows`` waiting rows (None when none wait): ``rows`` (the seven replay
        arrays), ``seq``, ``version``, ``finished`` (EpisodeOutcome), ``starts_chain`` (the first row follows no
        earlier row), ``incarnation``. Never waits for the loop. A ``learner`` that no longer holds the actor gets
        no rows, only ``taken_over_by`` (the holder's label, None when none holds it)."""
        if learner is not None and not self._heard_from(learner):
            return {"taken_over_by": self._learner_label}
        entries = self.outbox.take(max_rows)
        if not entries:
            return None
        rows = tuple(np.concatenate(parts) for parts in zip(*(entry.row for entry in entries)))
        return {"rows": rows, "seq": np.array([entry.seq for entry in entries], np.int64),
                "version": np.array([entry.version for entry in entries], np.int64),
                "finished": [outcome for entry in entries for outcome in entry.finished],
                "starts_chain": entries[0].starts_chain, "incarnation": self.incarnation}

    def stats(self) -> RobotActorStats:
        with self._stats_lock:
            ticks, steps, episodes = list(self._ticks), self.steps, self.episodes
        periods = np.diff(ticks) if len(ticks) > 1 else np.zeros(0)
        robot = self._robot_env()
        with self._learner_lock:
            learner = self._learner_label
            learner_heard_s = None if learner is None else time.monotonic() - self._learner_heard
        return RobotActorStats(
            steps=steps, episodes=episodes, target_rate_hz=self.target_rate,
            achieved_rate_hz=float(len(periods) / periods.sum()) if periods.sum() > 0 else 0.0,
            period_ms_p50=float(np.percentile(periods, 50) * 1e3) if len(periods) else None,
            period_ms_p99=float(np.percentile(periods, 99) * 1e3) if len(periods) else None,
            window=len(periods), weights_version=self.version,
            seconds_since_weights=None if self._weights_at is None else time.monotonic() - self._weights_at,
            rows_waiting=len(self.outbox), rows_delivered=self.outbox.delivered, rows_dropped=self.outbox.dropped,
            running=self._loop.is_alive(), error=self.error, robot_error=self.robot_error,
            weights_error=self.weights_error,
            safety_interventions=robot.log.total if robot is not None else 0, aborted_steps=self.aborted_steps,
            incarnation=self.incarnation, pid=os.getpid(), stop_requested=self.stop_requested, learner=learner,
            learner_heard_s=learner_heard_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop after its current step and close the env (a robot is sent its hold command)."""
        self._stop.set()
        self._loop.join(timeout_s)
        self._fetcher.join(timeout_s)
        if self.operator is not None:
            self.operator.close()
        self.envs.close()

    # --- the loop thread ----------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        from robofinetune.robot.errors import RobotError
        from robofinetune.robot.safety import RateLoop

        # a robot paces itself (RobotEnv.step waits for its tick or its observations); a simulator would run flat out
        pacer = None if self.is_robot else RateLoop(self.target_rate)
        restarts, must_start, chain_breaks = 0, True, True
        try:
            while not self._stop.is_set():
                if self.operator is not None and self.operator.stop_requested:
                    # the operator's stop key (or e-stop) at the robot: the run ends here, as in-process; the rows
                    # acted up to now stay in the outbox for the learner, which ends its run once it has them
                    self.stop_requested = True
                    robot = self._robot_env()
                    if robot is not None:
                        robot.end_episode()   # a realtime robot holds instead of applying the last command
                    print("robot actor: the operator asked to stop; the control loop ended", flush=True)
                    break
                try:
                    if must_start:
                        reset_seed, sampling_seed, _ = worker_seeds(self.spec.seed, self.steps, 0, restarts)
                        self.acting.start(reset_seed, sampling_seed)
                        must_start = False
                        if pacer is not None:
                            pacer.reset()
                    self._load_new_weights()
                    version = self.version
                    warming_up = version < 0 or self.steps < self.spec.warmup_steps
                    row, transitions = self.acting.step(warming_up)
                except RobotError as error:
                    # the robot is held (RobotEnv's safety: watchdog, e-stop); start over when it answers again
                    self.robot_error = f"{type(error).__name__}: {error}"
                    restarts, must_start, chain_breaks = restarts + 1, True, True
                    self._stop.wait(ROBOT_RETRY_S)
                    continue
                if pacer is not None:
                    pacer.sleep()
                with self._stats_lock:
                    self._ticks.append(time.monotonic())
                    self.steps += 1
                    self.episodes += len(transitions.finished)
                self.robot_error = None
                if transitions.aborted is not None and transitions.aborted.any():
                    # the robot aborted the episode (observations stopped): the step is no transition; the env
                    # already started the next episode, whose first row follows nothing
                    self.aborted_steps += 1
                    chain_breaks = True
                    continue
                self.outbox.put(version, row, transitions.finished, chain_breaks)
                chain_breaks = False
        except BaseException as error:   # noqa: BLE001 - reported through stats() and drains, not lost in a thread
            self.error = f"{type(error).__name__}: {error}"

    def _load_new_weights(self) -> None:
        with self._weights_lock:
            new, self._new_weights = self._new_weights, None
        if new is not None:
            version, state = new
            load_numpy_state(self.actor, state)
            self.version, self._weights_at = version, time.monotonic()

    # --- the weights thread ---------------------------------------------------------------------------------------

    def _fetch_weights(self) -> None:
        """Fetch the newest published weights for the loop to load between two steps. Ray calls to the store
        happen here, never in the loop: a slow or vanished learner delays only this thread."""
        ray = import_ray()
        while not self._stop.is_set():
            with self._subscriber_lock:
                subscriber = self._subscriber
            pause = self.spec.weights_poll_s
            try:
                state = subscriber.poll() if subscriber is not None else None
            except ray.exceptions.RayError as error:   # the learner (its store or weights' owner) is gone
                self.weights_error = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
                state, pause = None, max(pause, 1.0)
            if state is not None:
                with self._weights_lock:
                    self._new_weights = (subscriber.version, state)
                self.weights_error = None
            self._stop.wait(pause)

    def _robot_env(self) -> Any:
        from robofinetune.robot.env import RobotEnv

        env = self.envs.envs[0].unwrapped if hasattr(self.envs, "envs") else None
        return env if isinstance(env, RobotEnv) else None


def _control_rate(spec: RobotActorSpec) -> tuple[bool, float, dict[str, Any]]:
    """(is a robot, the loop's rate in Hz, make_env's overrides with the rate set for a robot)."""
    from robofinetune.envs import load_task_spec
    from robofinetune.envs.spec import task_source_for

    overrides = dict(spec.overrides)
    if task_source_for(spec.task) is None:
        return False, float(spec.control_rate or load_task_spec(spec.task).control_freq), overrides
    from robofinetune.robot.config import load_robot_config

    if spec.control_rate is not None:
        overrides["control_rate"] = float(spec.control_rate)
    robot = load_robot_config(spec.task, overrides or None)
    if "control_rate" not in robot.raw:
        raise ConfigError(f"robot file '{spec.task}' has no 'control_rate': the robot actor runs the loop at the "
                          f"robot's control rate, so write it there (Hz, e.g. `control_rate: 20`) or pass one")
    return True, float(robot.control_rate), overrides


def _make_envs(spec: RobotActorSpec, overrides: dict[str, Any], is_robot: bool) -> tuple[Any, Any]:
    """One env as the one-env vector env ResidualActing steps: a robot, with its operator when ``teleop``; a
    simulated task, with its scripted expert when ``intervener='scripted'``. Either way the env is wrapped in
    ``InterventionWrapper`` by ``make_training_envs``, as the in-process ``train residual`` wraps its envs."""
    from robofinetune.envs import make_vector_env

    seed = worker_seeds(spec.seed, 0, 0)[0]
    if not spec.teleop and spec.intervener == "none":
        return make_vector_env(spec.task, 1, seed=seed, asynchronous=False, **overrides), None
    if spec.teleop and not is_robot:
        raise ConfigError(f"robot actor: teleop ({spec.teleop!r}) needs a robot YAML task, got {spec.task!r}")
    if overrides:
        what = f"teleop ({spec.teleop!r})" if spec.teleop else f"intervener {spec.intervener!r}"
        raise ConfigError(f"robot actor: {what} with overrides ({sorted(overrides)}) is not supported; write them "
                          f"into the task's or robot's YAML")
    from robofinetune.rl.interventions import ScriptedInterventionConfig, make_training_envs

    # make_training_envs refuses a scripted intervener on a robot (it needs the simulator's state)
    envs, operator = make_training_envs(spec.task, 1, seed, intervener=spec.intervener, teleop=spec.teleop,
                                        scripted=ScriptedInterventionConfig(**spec.scripted))
    if operator is not None and operator.mark_ends_episode:
        envs.close()   # the wrapper closes its operator (source, keys)
        raise ConfigError(f"robot file '{spec.task}' has no success topic: its episodes wait for an operator's "
                          f"mark, which a free-running robot actor cannot; add a 'success' topic")
    return envs, operator


def _local_path(path: str) -> str:
    """An existing local path made absolute (Ray workers need not share the caller's working directory); anything
    else (a task name, or a path that exists only on the robot's machine) as given."""
    return str(Path(path).resolve()) if Path(path).exists() else path


@dataclass(eq=False)   # rows are arrays
class RobotBatch(RolloutBatch):
    """A :class:`RolloutBatch` from the robot actor (worker 0, env 0), with each row's sequence number.
    ``dropped_envs == [0]``: the first row does not follow the last row this link delivered (end the replay chain
    before storing it)."""

    seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class RobotActorHandle:
    """A running :class:`RobotActor` found by name, to read its stats or stop it. It attaches no learner: it takes
    no weights over and drains no rows, so a shell can look at (or stop) an actor a learner uses or left running
    (``robofinetune robot-actor status|stop``)."""

    def __init__(self, actor: Any, name: str, namespace: str) -> None:
        self._ray = import_ray()
        self.actor, self.name, self.namespace = actor, name, namespace

    @classmethod
    def find(cls, name: str = "robot", namespace: str = DEFAULT_NAMESPACE,
             ray_address: str | None = None) -> RobotActorHandle:
        """The running robot actor ``name``; :class:`RobotActorError` when none runs."""
        actor, _ = _running_actor(name, namespace, ray_address)
        return cls(actor, name, namespace)

    def stats(self) -> RobotActorStats:
        return self._call("stats")

    def stop(self) -> None:
        """Stop the robot actor's loop (the robot holds), then end the actor."""
        try:
            self._ray.get(self.actor.stop.remote(), timeout=30)
        except (self._ray.exceptions.RayError, TimeoutError):
            pass   # dead or hung: killed below anyway
        self._ray.kill(self.actor)

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return self._ray.get(getattr(self.actor, method).remote(*args))
        except self._ray.exceptions.RayActorError as error:
            raise RobotActorError(f"robot actor {self.name!r} is gone (its process or node died; the robot's own "
                                  f"driver decides what the robot does now): {error}") from error


class RobotActorLink(RobotActorHandle):
    """The learner's handle on a running :class:`RobotActor`: publish weights, drain rows, read stats.

    :meth:`start` starts the actor (named ``name`` in ``namespace``, detached: it outlives this process);
    :meth:`attach` finds a running one. Either attaches this learner, refused while another learner holds the
    actor (module docstring: one learner at a time) unless ``takeover``; a thread of this link sends the actor a
    heartbeat while it is attached. :meth:`detach` lets go and leaves it running; :meth:`stop` ends it.
    ``weights_every``: :meth:`publish` sends the actor's weights every this many learner updates.
    :attr:`stop_requested`: the operator stopped the actor's loop at the robot and every row it acted before that
    was drained (the learner ends its run).
    """

    def __init__(self, actor: Any, name: str, namespace: str, weights_every: int = 1, takeover: bool = False) -> None:
        super().__init__(actor, name, namespace)
        self.broadcaster = WeightBroadcaster(weights_every)
        self.learner_id = uuid.uuid4().hex
        self.learner_label = f"{socket.gethostname()} pid {os.getpid()}"
        self._last_seq: int | None = None
        self._incarnation: str | None = None
        self.stop_requested = False
        self.closed = False
        try:
            reply = self._ray.get(actor.subscribe.remote(self.broadcaster.store, self.learner_id, self.learner_label,
                                                         takeover))
            if reply["refused"] is not None:
                holder = reply["refused"]
                raise RobotActorInUse(
                    f"robot actor {name!r} (namespace {namespace!r}) is in use by another learner "
                    f"({holder['learner']}, heard from {holder['heard_s']:.1f} s ago): one learner drives a robot "
                    f"actor at a time. Stop that learner (it lets go when it ends), or, if it died without "
                    f"letting go, attach again once it has not been heard from for {reply['lease_s']:g} s; to take "
                    f"the actor over from a learner that is still running, attach with takeover (train residual "
                    f"--robot_actor_takeover=true), which refuses that learner's next drain", reply["lease_s"])
        except BaseException:
            self._ray.kill(self.broadcaster.store)
            raise
        self._heartbeat_stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._send_heartbeats, args=(reply["lease_s"] / 4,),
                                           name="robot-actor-heartbeat", daemon=True)
        self._heartbeat.start()

    @classmethod
    def start(cls, spec: RobotActorSpec, name: str = "robot", namespace: str = DEFAULT_NAMESPACE,
              resources: dict[str, float] | None = None, node_id: str | None = None, num_cpus: float = 1.0,
              weights_every: int = 1, ray_address: str | None = None,
              start_timeout_s: float = DEFAULT_START_TIMEOUT_S) -> RobotActorLink:
        """Start the robot actor (refused when one of this name runs: :meth:`attach` to it). ``resources`` (e.g.
        ``{"robot": 1}``) or ``node_id`` pin it to the robot's machine (module docstring). ``ray_address`` None
        starts a local Ray when this process has none, which ends with this process and the actor with it: a learner
        that should be able to restart joins a cluster (``"auto"``) instead."""
        spec.check()
        ray = import_ray()
        init_ray(ray_address)
        if _find_actor(ray, name, namespace) is not None:
            raise RobotActorError(f"a robot actor named {name!r} already runs in namespace {namespace!r}: attach to "
                                  f"it (RobotActorLink.attach) or stop it first")
        options: dict[str, Any] = {"name": name, "namespace": namespace, "lifetime": "detached", "num_cpus": num_cpus,
                                   "max_concurrency": ACTOR_CONCURRENCY, "max_restarts": 0}
        options.update(_placement(ray, resources, node_id))
        spec = RobotActorSpec(**{**asdict(spec), "task": _local_path(spec.task), "base": _local_path(spec.base)})
        actor = ray.remote(RobotActor).options(**options).remote(spec, logs.snapshot())
        try:
            ray.get(actor.identity.remote(), timeout=start_timeout_s)
            return cls(actor, name, namespace, weights_every)
        except BaseException as error:
            ray.kill(actor)
            translated = start_error(ray, error, "robot actor", spec.task, start_timeout_s)
            if translated is not None:
                raise RobotActorError(str(translated)) from error
            raise

    @classmethod
    def attach(cls, name: str = "robot", namespace: str = DEFAULT_NAMESPACE, weights_every: int = 1,
               ray_address: str | None = None, takeover: bool = False, wait_s: float = 0.0) -> RobotActorLink:
        """A link to the running robot actor ``name``: it keeps acting with its last weights until this link
        publishes, and this link drains the rows no earlier link drained. Refused (:class:`RobotActorInUse`)
        while another learner holds the actor, unless ``takeover``; with ``wait_s`` > 0 it asks again until the
        holder lets go or that long has passed (a learner that died without letting go loses its lease)."""
        actor, _ = _running_actor(name, namespace, ray_address)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return cls(actor, name, namespace, weights_every, takeover)
            except RobotActorInUse:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def publish(self, updates: int, module: Any, force: bool = False) -> bool:
        """Publish ``module``'s weights as version ``updates`` when ``weights_every`` updates passed since the last
        publication (always with ``force``); True when it did."""
        if force:
            self.broadcaster.publish(updates, module)
            return True
        return self.broadcaster.maybe_publish(updates, module)

    def drain(self, max_rows: int = 1024) -> RobotBatch | None:
        """The rows waiting on the robot actor (up to ``max_rows``), or None when none wait; never waits for the
        robot. None with :attr:`stop_requested` set: the operator stopped the loop and every row is drained.
        Raises :class:`RobotActorError` when the loop has stopped on an error and nothing is left, or when another
        learner took the actor over."""
        reply = self._call("drain", max_rows, self.learner_id)
        if reply is not None and "taken_over_by" in reply:
            raise RobotActorError(f"robot actor {self.name!r} was taken over by another learner "
                                  f"({reply['taken_over_by'] or 'which has let go since'}): this learner no longer "
                                  f"drives it")
        if reply is None:
            stats = self.stats()
            if stats.stop_requested:
                self.stop_requested = True
                return None
            if not stats.running:
                raise RobotActorError(f"robot actor {self.name!r}: its control loop stopped: {stats.error}")
            return None
        seq = reply["seq"]
        follows = (not reply["starts_chain"] and reply["incarnation"] == self._incarnation
                   and self._last_seq is not None and int(seq[0]) == self._last_seq + 1)
        self._last_seq, self._incarnation = int(seq[-1]), reply["incarnation"]
        return RobotBatch(worker=0, rows=reply["rows"], env_index=np.zeros(len(seq), np.int64),
                          version=reply["version"], finished=reply["finished"],
                          dropped_envs=[] if follows else [0], seq=seq)

    def _send_heartbeats(self, every_s: float) -> None:
        """Tell the actor this learner is alive while the main thread learns or checkpoints between drains."""
        while not self._heartbeat_stop.wait(every_s):
            try:
                self._ray.get(self.actor.heartbeat.remote(self.learner_id), timeout=every_s)
            except (self._ray.exceptions.RayError, TimeoutError):
                pass   # the actor is gone or slow: the next drain says so

    def detach(self) -> None:
        """Let go of the actor, which keeps running with the last weights it got (this link's store goes) and
        takes another learner at once."""
        self._close(release=True)

    def stop(self) -> None:
        """Stop the robot actor's loop (the robot holds), then end the actor."""
        super().stop()
        self._close(release=False)

    def _close(self, release: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._heartbeat_stop.set()
        if release:
            try:
                self._ray.get(self.actor.release.remote(self.learner_id), timeout=10)
            except (self._ray.exceptions.RayError, TimeoutError):
                pass   # gone or hung: the lease runs out instead
        self._ray.kill(self.broadcaster.store)


def _running_actor(name: str, namespace: str, ray_address: str | None) -> tuple[Any, Any]:
    """(the running robot actor ``name``, ray); :class:`RobotActorError` when none runs."""
    ray = import_ray()
    init_ray(ray_address)
    actor = _find_actor(ray, name, namespace)
    if actor is None:
        raise RobotActorError(f"no robot actor named {name!r} runs in namespace {namespace!r} (is this the "
                              f"robot's Ray cluster? `ray list actors` shows what runs there)")
    return actor, ray


def running_spec(name: str = "robot", namespace: str = DEFAULT_NAMESPACE,
                 ray_address: str | None = None) -> RobotActorSpec | None:
    """The spec of the running robot actor ``name`` (None when none runs), without attaching to it (checked
    before attaching: a learner of another policy must not hold it, even for a moment)."""
    ray = import_ray()
    init_ray(ray_address)
    actor = _find_actor(ray, name, namespace)
    if actor is None:
        return None
    try:
        return ray.get(actor.describe.remote(), timeout=60)
    except ray.exceptions.RayActorError as error:
        raise RobotActorError(f"robot actor {name!r} is gone: {error}") from error


def _find_actor(ray: Any, name: str, namespace: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def _placement(ray: Any, resources: dict[str, float] | None, node_id: str | None) -> dict[str, Any]:
    """Ray options that put the actor on the robot's machine; refused now when the cluster cannot, rather than
    left pending forever."""
    if resources and node_id:
        raise ConfigError("robot actor: pin it by resources or by node_id, not both")
    if resources:
        cluster = ray.cluster_resources()
        missing = {key: value for key, value in resources.items() if cluster.get(key, 0.0) < value}
        if missing:
            raise ConfigError(f"robot actor needs resources {missing} which no node of the Ray cluster offers: on the "
                              f"robot PC run `ray start --address=<head>:6379 --resources='{{\"robot\": 1}}'`")
        return {"resources": dict(resources)}
    if node_id:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
        if node_id not in alive:
            raise ConfigError(f"robot actor: node {node_id!r} is not an alive node of the Ray cluster "
                              f"(`ray list nodes`)")
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
    return {}

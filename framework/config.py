"""Hydra configuration: the root schema, plugin config groups, and the ``conf/`` search path.

The root :class:`PrismConfig` is stored in Hydra's ConfigStore as ``prism_schema``; ``conf/config.yaml``
uses it as its first default and chooses the default plugins. For every registry entry with a config
dataclass, :func:`register_plugin_configs` stores a node ``<kind>/<name>`` (the dataclass plus a
``name`` field), so ``model=NAME`` selects any registered model, third-party ones included, and the
dataclass gives Hydra the keys and types to validate overrides against. ``conf/<kind>/*.yaml`` add
presets to the same groups.

What each value may be (``train.batch_size >= 1``, ``checkpoint.best_mode`` one of max, min, ...) is declared
in the fields' metadata, next to them; :func:`prism.framework.validate.validate_config` checks a composed
config against it (plugin dataclasses declare theirs the same way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from prism.framework.augment import AugmentConfig
from prism.framework.registry import REGISTRIES, Entry

#: ``conf/`` beside the ``framework`` package (true for editable installs and wheels alike).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: Registry kinds that are chosen with a single config group (``model=...``, ``optimizer=...``).
SELECTED_KINDS = ("model", "dataset", "objective", "task", "optimizer", "schedule")


@dataclass
class TrainConfig:
    """How long and how to train.

    steps: total optimizer updates; 0 means ``epochs`` worth of the training split.
        ``eval_every``, ``log_every``, ``checkpoint.every`` and the step numbers in logs and
        checkpoints count batches; they equal optimizer updates unless ``grad_accum_steps`` > 1.
    epochs: used when ``steps`` is 0 (fractions allowed).
    batch_size: global batch (all devices, all hosts); must divide by the data-parallel size.
    eval_batch_size: global evaluation batch; 0 means ``batch_size``.
    eval_every: evaluate every N steps (0: once per epoch); always at the end.
    log_every: write metrics every N steps.
    grad_clip_norm: clip gradients to this global norm (0 disables).
    grad_accum_steps: accumulate gradients over N batches per optimizer update (optax.MultiSteps).
    ema_decay: keep an exponential moving average of the parameters with this decay (0 disables);
        evaluation then uses the EMA parameters.
    weight_decay_skip_1d: exclude biases and normalization parameters (ndim <= 1) from weight decay.
    max_eval_batches: cap on evaluation batches (0: the whole split).
    steps_per_call: at most this many training steps per device dispatch (0: auto, 64 on the device path,
        1 on the host path, which needs 1); a call also ends at every evaluation, checkpoint and the last
        step. Every step's metrics stay on the device and are written at the log steps after the call; the
        numbers equal one step per call's up to float rounding.
    time_to: evaluation values of ``checkpoint.best_metric`` to time: ``result.json``'s ``time_to``
        gives the seconds (from process start and from the first step) at which each was first reached.
    stop_at: end the run at the first evaluation whose ``checkpoint.best_metric`` reaches this value
        (0 disables; 'reaches' follows ``checkpoint.best_mode``).
    max_bad_steps: stop after this many steps whose loss, gradients or new non-parameter state (BatchNorm
        statistics, EMA targets) were not finite; such steps are never applied (the weights, optimizer state and
        statistics stay as before them), counted in the train state and in ``result.json``'s ``skipped_steps``.
        The check runs at each log step and before each save, so with ``train.log_every`` > 1 a few more bad
        steps may be counted before the run stops.
    """

    steps: int = field(default=0, metadata={"ge": 0})
    epochs: float = field(default=1.0, metadata={"gt": 0, "when": ("steps", 0)})
    batch_size: int = field(default=64, metadata={"ge": 1})
    eval_batch_size: int = field(default=0, metadata={"ge": 0})
    eval_every: int = field(default=0, metadata={"ge": 0})
    log_every: int = field(default=10, metadata={"ge": 1})
    grad_clip_norm: float = field(default=0.0, metadata={"ge": 0})
    grad_accum_steps: int = field(default=1, metadata={"ge": 1})
    ema_decay: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    weight_decay_skip_1d: bool = True
    max_eval_batches: int = field(default=0, metadata={"ge": 0})
    steps_per_call: int = field(default=0, metadata={"ge": 0})
    time_to: list[float] = field(default_factory=list, metadata={"finite": True})
    stop_at: float = field(default=0.0, metadata={"finite": True})
    max_bad_steps: int = field(default=1, metadata={"ge": 1})


@dataclass
class LoaderConfig:
    """Host input pipeline (grain).

    workers: grain worker processes (0: decode in the main process).
    threads: grain read threads per process (also the threads that decode a split for the device path);
        -1 (default): one per core of this machine, at most 16 (2 on a 2-core laptop, 16 on a GPU host).
    prefetch: batches prefetched by the host pipeline.
    device_prefetch: training batches the host path reads and copies to the devices ahead of the step, in a
        background thread (:mod:`prism.framework.device_prefetch`; 0: on the training thread, between steps).
    shuffle: shuffle the training split (a new permutation every epoch, seeded).
    placement: where the examples live while training: 'host' (read, batched and sent to the devices
        every step), 'device' (each split decoded once and kept in device memory; batches are gathered
        on the device), 'auto' (device when the decoded splits fit in ``device_memory_fraction`` of
        the memory of one device and every split's examples have fixed shapes; else host).
    device_memory_fraction: the share of one device's memory that 'auto' lets the resident data use.
    """

    workers: int = field(default=0, metadata={"ge": 0})
    threads: int = field(default=-1, metadata={"ge": -1})
    prefetch: int = field(default=2, metadata={"ge": 0})
    device_prefetch: int = field(default=2, metadata={"ge": 0})
    shuffle: bool = True
    placement: str = field(default="auto", metadata={"choices": ("auto", "device", "host")})
    device_memory_fraction: float = field(default=0.25, metadata={"gt": 0, "le": 1})


@dataclass
class CheckpointConfig:
    """orbax checkpointing.

    enabled: write checkpoints at all.
    every: save every N steps (0: at each evaluation); always at the end.
    keep: keep the last N checkpoints ...
    best_metric: ... plus the best one by this evaluation metric ('' disables).
    best_mode: 'max' or 'min' for ``best_metric``.
    async_save: write in a background thread while training continues.
    resume: resume from the latest checkpoint in the run directory when there is one.
    resume_changed: resume even when settings that change the run (seed, model, dataset, objective, optimizer,
        schedule, augmentation, precision, batch size, length) differ from the checkpoint's; without it such a
        resume is refused with the differing keys named.
    """

    enabled: bool = True
    every: int = field(default=0, metadata={"ge": 0})
    keep: int = field(default=2, metadata={"ge": 1})
    best_metric: str = ""
    best_mode: str = field(default="max", metadata={"choices": ("max", "min")})
    async_save: bool = True
    resume: bool = True
    resume_changed: bool = False


@dataclass
class ParallelConfig:
    """Device mesh.

    fsdp: size of the ``fsdp`` mesh axis; parameters are sharded over it (1: replicated).
    distributed: 'auto' initializes ``jax.distributed`` when the environment describes several
        processes (SLURM, or JAX_COORDINATOR_ADDRESS / PRISM_NUM_PROCESSES / PRISM_PROCESS_ID); 'on'
        always does; 'off' never does.
    devices_per_job: in a sweep whose launcher runs several jobs at once on one machine
        (``hydra/launcher=joblib``), give each job process its own set of this many GPUs (0: every job
        sees all devices).
    batch_stats: 'global' (default): BatchNorm statistics over the whole global batch, as on one device
        (SyncBN: the result does not depend on the number of devices, but every BatchNorm layer waits for
        an all-reduce in the forward and in the backward pass); 'per_device': each device's share of the
        batch (PyTorch DDP's default; no communication inside the step's forward/backward, faster on several
        GPUs). Applies to layers built from :class:`prism.framework.layers.BatchNorm` (all built-in models).
    """

    fsdp: int = field(default=1, metadata={"ge": 1})
    distributed: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})
    devices_per_job: int = field(default=0, metadata={"ge": 0})
    batch_stats: str = field(default="global", metadata={"choices": ("global", "per_device")})


@dataclass
class LoggingConfig:
    """Metric outputs in the run directory.

    progress: show a console progress bar (step, epoch, loss, img/s, ETA).
    tensorboard: write TensorBoard event files.
    plots: write PNG curves of every logged metric at the end.
    render: at the end, let the task draw its predictions for this many evaluation examples into
        ``predictions/`` (tasks that draw nothing write nothing; 0 disables).
    """

    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    render: int = field(default=8, metadata={"ge": 0})


@dataclass
class PrismConfig:
    """The root configuration of ``prism train``; plugin groups are chosen in ``conf/config.yaml``.

    evals: named evaluators run during training, big_vision style:
        ``evals: {NAME: {task: TASK_NAME, split: SPLIT, every: N, task_overrides: {...}}}``; ``task`` defaults
        to the run's task (its config), ``split`` to ``dataset.eval_split``, ``every`` (in steps) to
        ``train.eval_every``. Metrics are logged as ``eval/<metric>`` for an evaluator named ``main`` and
        ``<NAME>/<metric>`` otherwise. Set it whole (``evals={knn: {task: knn, every: 200}}``); None (the
        default): one evaluator ``main``, the run's task on the evaluation split.
    """

    model: Any = MISSING
    dataset: Any = MISSING
    objective: Any = MISSING
    task: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evals: Any = None
    seed: int = field(default=0, metadata={"ge": 0})
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})


#: Keys every plugin of a kind gets besides its own config fields: ``name``; for models ``pretrained``
#: (weights to load after initialisation, see :mod:`prism.framework.pretrained`; '' for none); for datasets
#: ``train_split`` and ``eval_split`` (the splits a run trains and evaluates on, TFDS split specs, slicing
#: allowed: ``train[:90%]``), so ``cfg.dataset.train_split`` is always there, and ``one_class`` (a class
#: index or name: the one-class protocol of :mod:`prism.framework.one_class`; '' for none). A plugin whose
#: dataclass declares one of these fields keeps its own (its default, type and metadata).
COMMON_FIELDS: dict[str, list[tuple[str, type, Any]]] = {
    "model": [("pretrained", str, "")],
    "dataset": [("train_split", str, "train"), ("eval_split", str, "test"), ("one_class", str, "")],
}


def config_node(entry: Entry) -> type:
    """The dataclass stored for ``entry``: its config dataclass plus a ``name`` field set to its name (and the
    kind's :data:`COMMON_FIELDS`)."""
    base = entry.config
    wanted = [("name", str, entry.name), *COMMON_FIELDS.get(entry.kind, [])]
    taken = {f.name for f in dataclasses.fields(base)} if base is not None else set()
    fields = [(n, t, field(default=d)) for n, t, d in wanted if n not in taken]
    if base is None:
        return dataclasses.make_dataclass(f"{entry.kind}_{entry.name}_node", fields)
    if not fields:
        return base
    return dataclasses.make_dataclass(f"{base.__name__}Node", fields, bases=(base,))


def register_configs() -> None:
    """Store the root schema and every registered plugin's config node in Hydra's ConfigStore.

    Idempotent; call again after registering plugins at run time (notebooks, tests).
    """
    cs = ConfigStore.instance()
    cs.store(name="prism_schema", node=PrismConfig)
    register_launcher()
    for kind, registry in REGISTRIES.items():
        if kind not in SELECTED_KINDS:
            continue
        for entry in registry.entries():
            cs.store(group=kind, name=entry.name, node=config_node(entry), provider=entry.module)


def register_launcher() -> None:
    """prism's sweep launcher (``hydra/launcher=prism``, the default): its config node in the ConfigStore and its
    class in Hydra's plugin list (Hydra's own scan misses it in editable installs)."""
    import hydra_plugins.prism_launcher as launcher

    launcher.register()


def group_options(kind: str) -> list[str]:
    """Names selectable for config group ``kind``: registered plugins and ``conf/<kind>/*.yaml`` presets."""
    names = set(REGISTRIES[kind].names())
    names.update(p.stem for p in (CONF_DIR / kind).glob("*.yaml"))
    return sorted(names)


def compose(overrides: list[str] | None = None, config_name: str = "config", *, validate: bool = True):
    """The composed run config for ``overrides``, as ``prism train`` would build it (without running).

    For notebooks and tests: ``Trainer(compose(["train.steps=10"]), run_dir).fit()``. Hydra's
    ``hydra.*`` keys and run directory are not resolved here. ``validate`` (default): refuse ``+key=...``
    overrides adding keys no schema has, and check the result with
    :func:`prism.framework.validate.validate_config` (a :class:`~prism.framework.errors.ConfigError` naming
    the key, the value and the allowed range).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from prism.framework.plugins import load_plugins
    from prism.framework.validate import check_added_keys, validate_config

    load_plugins()
    register_configs()
    overrides = list(overrides or [])
    if validate:
        check_added_keys(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    if validate:
        validate_config(cfg)
    return cfg

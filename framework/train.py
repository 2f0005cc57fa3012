"""The Trainer: build a run from its config, train data-parallel, evaluate, checkpoint, resume.

Reading order: :class:`Trainer.__init__` builds dataset -> task -> model + objective -> optimizer ->
sharded state; :meth:`Trainer.fit` is the loop. The step functions are pure (``jax.jit`` over a
``TrainState`` pytree with donated buffers); the model and objective are NNX modules split into a
static graph and array state (``nnx.split``) so that jit sees only arrays.

Determinism: the data stream is a function of (seed, step) (:mod:`prism.framework.data`), the step's PRNG
key is ``fold_in(seed_key, step)``, and all of it is in the checkpoint, so a resumed run computes
the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import DictConfig, OmegaConf

from prism.framework import parallel
from prism.framework.api import CopiesModelWeights, DataInfo, DataInitialized, DataSource, Task
from prism.framework.augment import Pipeline
from prism.framework.checkpoint import Checkpointer, flatten_nested, signature
from prism.framework.data import VALID_KEY, eval_batches, train_iterator
from prism.framework.errors import ConfigError, NonFiniteLossError
from prism.framework.logging import MetricLogger, plot_curves, to_json
from prism.framework.optim import build_optimizer, plugin_config
from prism.framework.pretrained import ImportReport, load_pretrained
from prism.framework.registry import DATASETS, MODELS, OBJECTIVES, TASKS
from prism.framework.resident import ResidentSplit, choose_placement, train_index_stream
from prism.framework.rundir import failure_record
from prism.framework.steps import TrainState, make_eval_step, make_train_step, multi_eval, multi_step
from prism.framework.timing import Phases, TimeTo, process_seconds

RESULT_FILE = "result.json"
PREDICTIONS_DIR = "predictions"
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
#: XLA options for programs that run once (parameter initialization) on the CPU backend: no LLVM optimization.
#: With JAX's default partitionable threefry, LLVM's optimizer takes most of the CPU compile of an init program
#: (a width-4 YOLOv3: ~35 s -> ~3 s); the run time of a one-off program does not matter. Values agree up to
#: rounding (unoptimized code does not fuse multiply-adds into FMAs; normal draws differ by <= 3 ulp). Other
#: backends keep their defaults (their init compiles are fast, and their numbers stay as they were).
RUN_ONCE = {"xla_backend_optimization_level": 0}
#: Training images a :class:`~prism.framework.api.DataInitialized` model sees at initialization.
DATA_INIT_EXAMPLES = 5000
#: Training steps per call on the device path when ``train.steps_per_call`` is 0 (a call also ends at every
#: evaluation and checkpoint); enough that dispatch and the host's bookkeeping vanish beside the steps.
AUTO_STEPS_PER_CALL = 64


def _run_once_options() -> dict | None:
    return RUN_ONCE if jax.default_backend() == "cpu" else None


class System(nnx.Module):
    """What is trained: the model and the objective (with any trainable parts the objective owns)."""

    def __init__(self, model: nnx.Module, objective: nnx.Module) -> None:
        self.model = model
        self.objective = objective


#: Config keys (and sections) whose values make a run what it is: a resume with other values is refused.
RUN_DEFINING = ("seed", "precision", "model", "dataset", "objective", "optimizer", "schedule", "augment",
                "train.batch_size", "train.steps", "train.epochs", "train.grad_accum_steps", "train.ema_decay",
                "train.grad_clip_norm", "train.weight_decay_skip_1d")
#: Keys inside those sections that do not change the numbers (where data lives, how a run starts).
NOT_RUN_DEFINING = ("model.pretrained", "dataset.data_dir")


def _dotted(tree: dict) -> dict[str, Any]:
    return {".".join(keys): value for keys, value in flatten_nested(tree).items()}


def _defines_the_run(key: str) -> bool:
    within = lambda names: any(key == n or key.startswith(n + ".") for n in names)  # noqa: E731
    return within(RUN_DEFINING) and not within(NOT_RUN_DEFINING)


def _build_plugin(registry, section: DictConfig, optional: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Build ``section``'s plugin with ``kwargs``, plus those of ``optional`` its builder declares."""
    entry = registry.get(section.name)
    if optional:
        params = inspect.signature(entry.builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs.update({k: v for k, v in optional.items() if takes_any or k in params})
    if entry.config is None:
        return entry.builder(**kwargs)
    return entry.builder(plugin_config(section), **kwargs)


def _set_compute_dtype(system: nnx.Module, dtype) -> None:
    """Make every flax layer compute in ``dtype`` (their ``dtype`` attribute; parameters and BatchNorm
    statistics keep their float32 storage). Without it a layer infers its dtype by promotion, and
    BatchNorm's float32 running statistics promote the activations back to float32."""
    for _, module in nnx.iter_modules(system):
        if hasattr(module, "dtype") and hasattr(module, "param_dtype"):
            module.dtype = dtype


def total_steps(cfg: DictConfig, train_size: int) -> tuple[int, float]:
    """``(optimizer updates, micro-steps per epoch)`` from ``train.steps`` or ``train.epochs``."""
    t = cfg.train
    steps_per_epoch = train_size / (t.batch_size * t.grad_accum_steps)
    updates = t.steps if t.steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    if updates <= 0:
        raise ConfigError(f"the run has no steps: train.steps={t.steps}, train.epochs={t.epochs}")
    return updates, train_size / t.batch_size


class _Preemption:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks, so the run saves and exits
    cleanly; a second Ctrl-C interrupts at once (Python's default handler is back after the first)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.received: str | None = None  # "SIGTERM" or "SIGINT" once one arrived
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Preemption:
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C is a KeyboardInterrupt
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class Trainer:
    """Builds every part of a run from ``cfg`` and trains it in ``run_dir``."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, *, initialize: bool = True) -> None:
        """``initialize=False`` skips computing the initial weights (``state`` stays None, ``abstract_state``
        describes it) for callers that restore a checkpoint next: evaluation and prediction."""
        self.cfg = cfg
        self.startup_s = process_seconds()
        self.phases = Phases()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
        self.compute_dtype = PRECISIONS[cfg.precision]
        parallel.maybe_initialize_distributed(cfg.parallel.distributed)
        self.is_main = jax.process_index() == 0
        self.mesh = parallel.make_mesh(cfg.parallel.fsdp)

        with self.phases("prepare"):
            self.source: DataSource = _build_plugin(DATASETS, cfg.dataset)
            self.info: DataInfo = self.source.info
            self.train_split = self.source.split(cfg.dataset.train_split)
            self.eval_split = self.source.split(cfg.dataset.eval_split)
            self.placement = choose_placement(cfg.loader.placement, [self.train_split, self.eval_split],
                                              cfg.loader.device_memory_fraction)
            self._resident: dict[str, ResidentSplit] = {}  # split name -> its examples on the devices
            if self.placement == "device" and initialize:  # before init: a data-fitted model reads them there
                self.resident(cfg.dataset.train_split)
                self.resident(cfg.dataset.eval_split)
        self.task = self.build_task(cfg.task)

        t = cfg.train
        self.accum = t.grad_accum_steps
        self.updates, self.steps_per_epoch = total_steps(cfg, len(self.train_split))
        self.micro_steps = self.updates * self.accum
        self.eval_every = t.eval_every or max(1, round(self.steps_per_epoch))
        self.host = parallel.host_batch_slice(t.batch_size, self.mesh)
        self.eval_batch_size = t.eval_batch_size or t.batch_size
        self.eval_host = parallel.host_batch_slice(self.eval_batch_size, self.mesh)
        self.optimizer = build_optimizer(cfg, updates=self.updates)
        with self.phases("init"):
            self._build_state(initialize)
            self._compile_steps()
        self.checkpointer: Checkpointer | None = None  # opened by fit(), closed when it returns

    # -- construction ---------------------------------------------------------------------------
    def build_task(self, section: DictConfig) -> Task:
        """The task of config ``section`` (a ``task`` node) for this run's dataset; :meth:`evaluate` takes it."""
        return _build_plugin(TASKS, section, data=self.info)

    def _create_system(self, key: jax.Array) -> System:
        rngs = nnx.Rngs(key)
        model = _build_plugin(MODELS, self.cfg.model, data=self.info, rngs=rngs)
        objective = _build_plugin(OBJECTIVES, self.cfg.objective, {"total_steps": self.micro_steps}, model=model,
                                  data=self.info, rngs=rngs)
        return System(model, objective)

    def _build_state(self, initialize: bool = True) -> None:
        """Create parameters and optimizer state directly with their shardings (no host copy); without
        ``initialize`` only their abstract description (shapes, dtypes, shardings)."""
        key = jax.random.key(self.cfg.seed)
        abstract_system = nnx.eval_shape(lambda: self._create_system(key))
        if self.compute_dtype != jnp.float32:
            _set_compute_dtype(abstract_system, self.compute_dtype)
        parallel.set_batch_stats(abstract_system, self.cfg.parallel.batch_stats, self.mesh)
        self.graphdef, _, _ = nnx.split(abstract_system, nnx.Param, ...)
        abstract_system.eval()
        self.eval_graphdef, _, _ = nnx.split(abstract_system, nnx.Param, ...)
        tx, use_ema = self.optimizer.tx, self.cfg.train.ema_decay > 0

        def init(k: jax.Array) -> TrainState:
            _, params, rest = nnx.split(self._create_system(k), nnx.Param, ...)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                              opt_state=tx.init(params), ema_params=params if use_ema else None,
                              bad_step=jnp.full((), -1, jnp.int32))

        self.abstract_state = jax.eval_shape(init, key)
        self.state_shardings = parallel.state_shardings(self.mesh, self.abstract_state)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state,
            self.state_shardings)
        self.state: TrainState | None = None
        self.pretrained: ImportReport | None = None
        if initialize:
            self.state = jax.jit(init, out_shardings=self.state_shardings, compiler_options=_run_once_options())(key)
            self.pretrained = self._load_pretrained()
            if self.pretrained is None and not self._has_checkpoint_to_resume():
                self._fit_to_data()
        self.param_count = sum(x.size for x in jax.tree.leaves(self.abstract_state.params))

    def _has_checkpoint_to_resume(self) -> bool:
        ckpt = self.cfg.checkpoint
        directory = self.run_dir / "checkpoints"
        return bool(ckpt.enabled and ckpt.resume and directory.is_dir()
                    and any(p.name.isdigit() for p in directory.iterdir()))

    def _load_pretrained(self) -> ImportReport | None:
        """Fill the model with ``model.pretrained`` weights (a weight file or a prism run, see
        :mod:`prism.framework.pretrained`), then start the optimizer (and parameter EMA) from them."""
        path = self.cfg.model.get("pretrained", "")
        if not isinstance(path, str) or not path or self._has_checkpoint_to_resume():
            return None  # a resumed run takes its weights from its own checkpoint (the file may be gone by then)
        system = nnx.merge(self.graphdef, self.state.params, self.state.rest, copy=True)
        report = load_pretrained(system.model, self.cfg.model.name, path)
        if isinstance(system.objective, CopiesModelWeights):  # e.g. BYOL's target starts as the loaded network
            system.objective.copy_model_weights(system.model)
        _, params, rest = nnx.split(system, nnx.Param, ...)
        params = jax.device_put(params, self.state_shardings.params)
        rest = jax.device_put(rest, self.state_shardings.rest)
        opt_state = jax.jit(self.optimizer.tx.init, out_shardings=self.state_shardings.opt_state,
                            compiler_options=_run_once_options())(params)
        ema = params if self.state.ema_params is not None else None
        self.state = self.state._replace(params=params, rest=rest, opt_state=opt_state, ema_params=ema)
        return report

    def _fit_to_data(self) -> None:
        """Let a model that sets some weights from training data (:class:`~prism.framework.api.DataInitialized`,
        e.g. a whitening first layer) do so from the first ``DATA_INIT_EXAMPLES`` training images."""
        system = nnx.merge(self.graphdef, self.state.params, self.state.rest, copy=True)
        if not isinstance(system.model, DataInitialized):
            return
        count = min(len(self.train_split), DATA_INIT_EXAMPLES)
        resident = self._resident.get(self.cfg.dataset.train_split)
        if resident is not None:  # decoded already: read back from the devices
            images = np.asarray(jax.device_get(resident.arrays["image"][:count]))
        else:
            images = np.stack([np.asarray(self.train_split[i]["image"]) for i in range(count)])
        system.model.fit_to_data(images)
        if isinstance(system.objective, CopiesModelWeights):
            system.objective.copy_model_weights(system.model)
        _, params, rest = nnx.split(system, nnx.Param, ...)
        self.state = self.state._replace(params=jax.device_put(params, self.state_shardings.params),
                                         rest=jax.device_put(rest, self.state_shardings.rest))
        if self.state.ema_params is not None:
            self.state = self.state._replace(ema_params=self.state.params)

    def _compile_steps(self) -> None:
        cfg, info = self.cfg, self.info
        pipeline = Pipeline.from_config(cfg.augment.ops, mean=info.mean, std=info.std)
        views = [Pipeline.from_config(ops, mean=info.mean, std=info.std, where=f"augment.views[{i}]")
                 for i, ops in enumerate(cfg.augment.views)]
        step = make_train_step(self.graphdef, self.optimizer, info, dtype=self.compute_dtype, seed=cfg.seed,
                               accum=self.accum, ema_decay=cfg.train.ema_decay, pipeline=pipeline,
                               view_pipelines=views, epoch_length=len(self.train_split))
        replicated = parallel.replicated(self.mesh)
        self.train_step = jax.jit(step, donate_argnums=0, out_shardings=(self.state_shardings, replicated))
        self.steps_per_call = self._steps_per_call()
        steps = multi_step(step, max_steps=self.steps_per_call, batch_sharding=parallel.batch_sharding(self.mesh))
        #: the device path's training call: several steps, each gathering its batch from the resident split
        self.train_steps = jax.jit(steps, donate_argnums=0, out_shardings=(self.state_shardings, replicated))
        #: id(task) -> (task, kept alive so that ids stay unique; its programs: see _eval_programs)
        self._eval_steps: dict[int, tuple[Task, Callable, Callable]] = {}
        self.eval_step = self._eval_step_for(self.task)

    def _steps_per_call(self) -> int:
        """``train.steps_per_call``, or its automatic value: 1 on the host path (each batch comes from the host
        anyway), on the device path ``AUTO_STEPS_PER_CALL`` capped by the run's length."""
        asked = self.cfg.train.steps_per_call
        if self.placement != "device":
            if asked > 1:
                raise ConfigError(f"train.steps_per_call={asked} needs the examples on the device "
                                  f"(loader.placement=device); the host path runs one step per call")
            return 1
        return min(asked or AUTO_STEPS_PER_CALL, self.micro_steps)

    def _eval_step_for(self, task: Task) -> Callable:
        """The jitted evaluation step of ``task`` (the run's own, or another task on the same model)."""
        return self._eval_programs(task)[0]

    def _eval_programs(self, task: Task) -> tuple[Callable, Callable]:
        """``(one batch, a whole device-resident split)``: the jitted evaluation programs of ``task``."""
        if id(task) not in self._eval_steps:
            eval_step = make_eval_step(self.eval_graphdef, task, self.info, dtype=self.compute_dtype)
            batches = parallel.batch_sharding(self.mesh)
            whole = multi_eval(eval_step, batch_sharding=batches)
            self._eval_steps[id(task)] = (task, jax.jit(eval_step, out_shardings=batches),
                                          jax.jit(whole, out_shardings=parallel.steps_batch_sharding(self.mesh)))
        return self._eval_steps[id(task)][1:]

    # -- data -----------------------------------------------------------------------------------
    def resident(self, split_name: str) -> ResidentSplit:
        """The split named ``split_name`` on the devices (``loader.placement=device``), decoded once."""
        if split_name not in self._resident:
            split = self.train_split if split_name == self.cfg.dataset.train_split else self.source.split(split_name)
            what = "training" if split_name == self.cfg.dataset.train_split else f"{split_name!r}"
            self._resident[split_name] = ResidentSplit(split, self.mesh, threads=self.cfg.loader.threads, what=what)
        return self._resident[split_name]

    def _train_calls(self):
        """``(checkpointable data iterator, call)``: ``call(count)`` runs the next ``count`` training steps on
        ``self.state`` and returns their logs, still on the device (``[steps_per_call]`` rows per name when
        ``steps_per_call`` > 1, else one step's values; ``count`` is then 1). The several-step program is
        compiled here (in the ``compile`` phase), the one-step program by its first call."""
        cfg, t = self.cfg, self.cfg.train
        if self.placement != "device":
            with self.phases("prepare"):
                data_iter = train_iterator(self.train_split, global_batch=t.batch_size, host=self.host,
                                           seed=cfg.seed, shuffle=cfg.loader.shuffle, workers=cfg.loader.workers,
                                           threads=cfg.loader.threads, prefetch=cfg.loader.prefetch)

            def host_call(count: int) -> dict:
                self.state, logs = self.train_step(self.state, parallel.global_batch(self.mesh, next(data_iter)))
                return logs

            return data_iter, host_call
        with self.phases("prepare"):  # kept on the devices already, unless built without initializing
            resident = self.resident(cfg.dataset.train_split)
            self.resident(cfg.dataset.eval_split)  # decoded now: in prepare_s, not in the first evaluation
        stream = train_index_stream(self.train_split, global_batch=t.batch_size, host=self.host, seed=cfg.seed,
                                    shuffle=cfg.loader.shuffle)
        rows = self.steps_per_call

        def indices(count: int) -> jax.Array:
            block = np.zeros((rows, self.host.per_host_batch), np.int32)  # rows past count: never read
            block[:count] = stream.take(count)
            return resident.step_indices(block)

        if rows == 1:  # one step per call: the host path's very program, on a batch gathered apart

            def gather_call(count: int) -> dict:
                self.state, logs = self.train_step(self.state, resident.batch(next(stream)))
                return logs

            return stream, gather_call
        with self.phases("compile"):
            compiled = self.train_steps.lower(self.state, resident.arrays, indices(0), np.int32(0)).compile()

        def device_call(count: int) -> dict:
            self.state, logs = compiled(self.state, resident.arrays, indices(count), np.int32(count))
            return logs

        return stream, device_call

    def _call_length(self, step: int) -> int:
        """Steps of the call that starts after ``step``: up to ``steps_per_call``, ending at the next evaluation,
        checkpoint or the last step (boundaries counted from step 0, so a resumed run makes the same calls)."""
        if self.steps_per_call == 1:
            return 1
        after = lambda every: (step // every + 1) * every  # noqa: E731  (the next multiple of ``every``)
        save_every = self.cfg.checkpoint.every or self.eval_every
        return min(step + self.steps_per_call, after(self.eval_every), after(save_every), self.micro_steps) - step

    def _device_batches(self, split_name: str, max_batches: int):
        """``(global batch, this host's validity mask)`` over a resident split."""
        return self.resident(split_name).eval_batches(global_batch=self.eval_batch_size, host=self.eval_host,
                                                      max_batches=max_batches)

    # -- evaluation -----------------------------------------------------------------------------
    def _host_batches(self, split, max_batches: int, raw: list):
        """``(global batch, this host's validity mask)`` over ``split`` read on the host; the first batch's
        valid examples are appended to ``raw`` (render draws them)."""
        for host_batch in eval_batches(split, global_batch=self.eval_batch_size, host=self.eval_host,
                                       max_batches=max_batches):
            valid = host_batch.pop(VALID_KEY)
            if not raw:
                raw.append({k: np.asarray(v)[np.asarray(valid, bool)] for k, v in host_batch.items()})
            yield parallel.global_batch(self.mesh, host_batch), valid

    def _eval_outputs(self, split, first_batch_only: bool = False, task: Task | None = None,
                      split_name: str | None = None):
        """``(task outputs, objective outputs, raw host batch of the first batch)`` over ``split``, padding
        removed; every host gets the whole split's outputs. ``task``: another task than the run's own.
        With ``split_name`` on the device path the split is evaluated from device memory (no raw batch)."""
        eval_step, whole_split = self._eval_programs(task or self.task)
        collected: tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]] = ({}, {})
        raw: list[dict] = []
        max_batches = 1 if first_batch_only else self.cfg.train.max_eval_batches
        on_device = split_name is not None and self.placement == "device" and not first_batch_only
        if on_device and jax.process_count() == 1:  # the whole split in one program, fetched once
            resident = self.resident(split_name)
            indices, valid = resident.eval_indices(global_batch=self.eval_batch_size, host=self.eval_host,
                                                   max_batches=max_batches)
            outputs = jax.device_get(whole_split(self.state, resident.arrays, resident.step_indices(indices)))
            keep = valid.reshape(-1)
            task_out, objective_out = ({k: np.asarray(v).reshape(-1, *v.shape[2:])[keep] for k, v in part.items()}
                                       for part in outputs)
            return task_out, objective_out, {}
        if on_device:
            batches = self._device_batches(split_name, max_batches)
        else:
            batches = self._host_batches(split, max_batches, raw)
        for batch, valid in batches:
            for part, into in zip(parallel.valid_outputs(eval_step(self.state, batch), valid), collected, strict=True):
                for name, value in part.items():
                    into.setdefault(name, []).append(value)
        task_out, objective_out = ({name: np.concatenate(parts) for name, parts in c.items()} for c in collected)
        return task_out, objective_out, raw[0] if raw else {}

    def _split_outputs(self, split_name: str, task: Task, shared: dict | None) -> tuple[dict, dict]:
        """``(task outputs, objective outputs)`` over the split named ``split_name``, taken from ``shared``
        when a task with the same ``eval_outputs_key`` already computed them there."""
        key = task.eval_outputs_key() if shared is not None else None
        if key is not None and (split_name, key) in shared:
            return shared[(split_name, key)]
        split = self.eval_split if split_name == self.cfg.dataset.eval_split else self.source.split(split_name)
        task_out, objective_out, _ = self._eval_outputs(split, task=task, split_name=split_name)
        if key is not None:  # read-only: a task that changed them in place would change them for the next
            for array in (*task_out.values(), *objective_out.values()):
                array.flags.writeable = False
            shared[(split_name, key)] = (task_out, objective_out)
        return task_out, objective_out

    def evaluate(self, task: Task | None = None, shared: dict | None = None) -> dict[str, float]:
        """The task's metrics over the whole evaluation split (padding masked out), on every host, plus the
        means of the objective's evaluation outputs (when it has any). A task with a ``reference_split``
        also gets its outputs over that split.

        ``task``: evaluate another task than the run's own on the same state (``prism eval eval.tasks=...``).
        ``shared``: a dict the caller keeps while the state does not change; outputs of tasks with an
        ``eval_outputs_key`` are stored there and reused by later tasks with the same key.
        """
        task = task or self.task
        task_out, objective_out = self._split_outputs(self.cfg.dataset.eval_split, task, shared)
        if task.reference_split:
            reference, _ = self._split_outputs(self._reference_split_name(task), task, shared)
            metrics = dict(task.summarize(task_out, reference=reference))
        else:
            metrics = dict(task.summarize(task_out))
        clash = sorted(set(metrics) & set(objective_out))
        if clash:
            task_name = self.cfg.task.name if task is self.task else getattr(task, "name", type(task).__name__)
            raise ConfigError(f"objective {self.cfg.objective.name!r} and task {task_name!r} both report "
                              f"evaluation metric(s) {clash}")
        metrics.update({name: float(np.mean(values)) for name, values in objective_out.items()})
        return {f"eval/{k}": v for k, v in metrics.items()}

    def _reference_split_name(self, task: Task | None = None) -> str:
        """The task's reference split; ``"train"`` is the split this run trains on (``dataset.train_split``),
        so a held-out evaluation slice of the same TFDS split never enters a kNN bank or a probe's data."""
        name = (task or self.task).reference_split
        return self.cfg.dataset.train_split if name == "train" else name

    def render(self, directory: Path, count: int, task: Task | None = None) -> list[Path]:
        """The task's pictures of its predictions for the first ``count`` evaluation examples (main host)."""
        task = task or self.task
        if count <= 0 or type(task).render is Task.render:  # a task that draws nothing: no batch to evaluate
            return []
        task_out, _, raw = self._eval_outputs(self.eval_split, first_batch_only=True, task=task)
        if not self.is_main or not raw:
            return []
        count = min(count, len(next(iter(raw.values()))))
        return task.render({k: v[:count] for k, v in raw.items()}, {k: v[:count] for k, v in task_out.items()},
                           directory)

    # -- checkpoints ----------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"model": self.cfg.model.name, "signature": signature(self.abstract_state),
                "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def _save(self, step: int, data_iter, metrics: dict | None) -> None:
        if self.checkpointer is None:
            return
        self._check_finite()
        self.checkpointer.save(step, self.state, data_state=data_iter.get_state(), meta=self._meta(),
                               metrics=metrics)

    def _check_finite(self) -> None:
        bad = int(jax.device_get(self.state.bad_step))
        if bad >= 0:
            last = self.checkpointer.latest_step() if self.checkpointer else None
            kept = f"the last good checkpoint is step {last} in {self.checkpointer.directory}" if last is not None \
                else "no checkpoint was written"
            raise NonFiniteLossError(
                f"the training loss, gradients or BatchNorm statistics became NaN/inf at step {bad}; that step's "
                f"update was not applied, {kept}. Lower optimizer.lr, enable train.grad_clip_norm, or check the data.")

    def _maybe_resume(self, data_iter) -> int:
        if self.checkpointer is None or not self.cfg.checkpoint.resume:
            return 0
        found = self.checkpointer.restore_latest(self.abstract_state, meta_check={"model": self.cfg.model.name})
        if found is None:
            return 0
        step, self.state, data_state, meta = found
        if not self.cfg.checkpoint.resume_changed:
            self._check_same_run(step, meta.get("config") or {})
        if data_state:
            data_iter.set_state(data_state)
        return step

    def _check_same_run(self, step: int, saved: dict) -> None:
        """A ConfigError naming the settings (``RUN_DEFINING``) whose values differ from those the checkpoint
        at ``step`` was trained with: resuming would silently mix two runs."""
        now = _dotted(OmegaConf.to_container(self.cfg, resolve=True))
        before = _dotted(saved)
        # keys both configs have: a field added to a schema since the checkpoint was written changes nothing
        keys = sorted(k for k in now.keys() & before.keys() if _defines_the_run(k) and now[k] != before[k])
        if keys:
            changes = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in keys[:6])
            more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
            raise ConfigError(f"the checkpoint at step {step} in {self.run_dir / 'checkpoints'} was trained with other "
                              f"settings ({changes}{more}); rerun with the same settings, use another "
                              f"hydra.run.dir, or set checkpoint.resume_changed=true to resume anyway")

    def _previous_result(self) -> dict:
        """This run directory's ``result.json`` from an earlier attempt ({} when there is none or it is unreadable)."""
        try:
            return json.loads((self.run_dir / RESULT_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _preempted_message(self, received: str | None, step: int) -> str:
        if self.checkpointer is None:
            return (f"{received} received: stopped at step {step}; nothing was saved (checkpoint.enabled=false), "
                    f"so the run cannot resume")
        return f"{received} received: saved step {step}; rerun in {self.run_dir} to resume"

    # -- the loop -------------------------------------------------------------------------------
    def _speed_record(self, rates: list[float], time_to: TimeTo, stopped_at: int | None) -> dict:
        """``timing`` (seconds per phase), ``process_s``, ``time_to``, ``loop_images_per_s`` (the median
        logged rate, the first log left out when there are others: it holds the compiling step) and
        ``stopped_at`` (the step ``train.stop_at`` ended the run at, else None)."""
        steady = rates[1:] if len(rates) > 1 else rates
        return {"timing": self.phases.record(self.startup_s), "process_s": round(process_seconds(), 3),
                "time_to": time_to.reached, "stopped_at": stopped_at,
                "loop_images_per_s": round(float(np.median(steady)), 1) if steady else None}

    def _log_call(self, logger: MetricLogger, logs: dict, first: int, count: int) -> tuple[dict, float] | None:
        """Write the logged steps among ``first+1 .. first+count`` (every ``train.log_every``-th and the last)
        from the call's ``logs``; returns the last one written and the images/s (None when none was due)."""
        due = [s for s in range(first + 1, first + count + 1) if s % self.cfg.train.log_every == 0
               or s == self.micro_steps]
        if not due:
            return None
        fetched = jax.device_get(logs)  # the only sync between calls
        stacked = self.steps_per_call > 1
        rows = [{k: float(v[s - first - 1] if stacked else v) for k, v in fetched.items()} for s in due]
        self._check_finite()
        rate = logger.progress(first + count, loss=rows[-1]["train/loss"], images_per_step=self.cfg.train.batch_size)
        for s, row in zip(due, rows, strict=True):
            logger.write(s, {**row, "train/images_per_s": rate})
        return rows[-1], rate

    def fit(self) -> dict:
        """Train to the configured number of steps; returns (and writes) the run's ``result.json``."""
        cfg, t = self.cfg, self.cfg.train
        started = time.perf_counter()
        data_iter, train_call = self._train_calls()  # timed inside: prepare (and compile on the device path)
        if cfg.checkpoint.enabled:
            self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint)
        start = self._maybe_resume(data_iter)
        logger = MetricLogger(self.run_dir, total_steps=self.micro_steps, start_step=start,
                              steps_per_epoch=self.steps_per_epoch, enabled=self.is_main,
                              progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard)
        for note in self.checkpointer.notes if self.checkpointer is not None else ():
            logger.message(note)
        if start:
            logger.message(f"resumed from the checkpoint at step {start} in {self.checkpointer.directory}")
        elif self.pretrained is not None:
            logger.message(self.pretrained.summary())
        status, step, eval_metrics, last_logged, interrupted_by = "completed", start, {}, {}, None
        phases, rates, stopped_at = self.phases, [], None
        first_step_at = time.perf_counter() if self.steps_per_call > 1 else None  # compiled already
        time_to = TimeTo(t.time_to, cfg.checkpoint.best_mode)
        if start >= self.micro_steps:  # a finished run: report its final evaluation again
            with phases("eval"):
                eval_metrics = self.evaluate()
            last_logged = self._previous_result().get("train_metrics") or {}
        save_every = cfg.checkpoint.every
        try:
            with _Preemption() as preemption:
                while step < self.micro_steps:
                    count = self._call_length(step)
                    with phases("train" if first_step_at is not None else "compile"):
                        logs = train_call(count)
                        if first_step_at is None:  # the host path's first call compiles: timed apart
                            jax.block_until_ready(self.state)
                            first_step_at = time.perf_counter()
                        logged = self._log_call(logger, logs, step, count)
                    step += count
                    last = step == self.micro_steps
                    if logged is not None:
                        last_logged, rate = logged
                        rates.append(rate)
                    evaluated = step % self.eval_every == 0 or last
                    if evaluated:
                        with phases("eval"):
                            eval_metrics = self.evaluate()
                        logger.write(step, eval_metrics)
                        target = eval_metrics.get(cfg.checkpoint.best_metric)
                        time_to.update(target, step, first_step_at)
                        if t.stop_at and target is not None and time_to.reaches(target, t.stop_at) and not last:
                            stopped_at, last = step, True
                            logger.message(f"{cfg.checkpoint.best_metric}={target:.4f} reached train.stop_at="
                                           f"{t.stop_at} at step {step}: stopping")
                    due = (step % save_every == 0) if save_every else evaluated
                    if due or last or preemption.requested:
                        with phases("checkpoint"):
                            self._save(step, data_iter, eval_metrics if evaluated else None)
                    if stopped_at is not None:
                        break
                    if preemption.requested and not last:
                        status, interrupted_by = "preempted", preemption.received
                        logger.message(self._preempted_message(interrupted_by, step))
                        break
        finally:
            with phases("checkpoint"):
                if self.checkpointer is not None:
                    self.checkpointer.close()
            logger.close()
        if status == "completed":
            with phases("render"):
                self.render(self.run_dir / PREDICTIONS_DIR, cfg.logging.render)
        result = {
            "status": status,
            "metrics": eval_metrics,
            "train_metrics": last_logged,
            "steps": step,
            "total_steps": self.micro_steps,
            "wall_s": round(time.perf_counter() - started, 3),
            "best_step": self.checkpointer.best_step() if self.checkpointer else None,
            "params": self.param_count,
            "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "processes": jax.process_count(),
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        if interrupted_by is not None:  # SIGTERM or SIGINT; resumable only when a checkpoint was written
            result.update(signal=interrupted_by, resumable=self.checkpointer is not None)
        if self.pretrained is not None:
            result["pretrained"] = {"path": self.pretrained.path, "loaded": self.pretrained.loaded,
                                    "head_skipped": self.pretrained.head_skipped}
        result.update(self._speed_record(rates, time_to, stopped_at))
        if self.is_main:
            (self.run_dir / RESULT_FILE).write_text(to_json(result, indent=2))
            if cfg.logging.plots:
                plot_curves(self.run_dir)
        return result


def write_failure(run_dir: Path, error: BaseException, extra: Callable[[], dict] | None = None) -> Path | None:
    """Record a failed run in its ``result.json`` (status, error type and message); over a finished run, in a
    new ``attempts/`` entry instead (:func:`prism.framework.rundir.failure_record`). Returns the file written."""
    if jax.process_index() != 0:
        return None
    result = {"status": "failed", "error": f"{type(error).__name__}: {error}", **(extra() if extra else {})}
    path = failure_record(run_dir)
    path.write_text(to_json(result, indent=2))
    return path

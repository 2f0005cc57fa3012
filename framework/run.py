"""The Run: a config assembled into the parts every command needs, and nothing that trains.

Reading order: mesh -> data source, its splits and their placement -> task -> step counts and optimizer ->
model + objective (a :class:`System`) -> the sharded :class:`~prism.framework.steps.TrainState` (or only its
abstract description, for a caller that restores a checkpoint next) -> pretrained weights / data-fitted
layers. ``prism train`` trains a Run (:class:`~prism.framework.train.Trainer`); ``prism eval``,
``prism predict`` and ``prism bench`` build one and use its state with the steps of
:mod:`prism.framework.steps` and the evaluation of :mod:`prism.framework.evaluators`. A Run writes no files.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import DictConfig

from prism.framework import parallel
from prism.framework.api import CopiesModelWeights, DataInfo, DataInitialized, DataSource, Task, missing_members
from prism.framework.data import read_threads
from prism.framework.errors import ConfigError
from prism.framework.model_check import check_model_fits
from prism.framework.one_class import apply_one_class
from prism.framework.optim import build_optimizer, plugin_config
from prism.framework.pretrained import ImportReport, load_pretrained
from prism.framework.registry import DATASETS, MODELS, OBJECTIVES, TASKS
from prism.framework.resident import ResidentSplit, choose_placement
from prism.framework.steps import TrainState
from prism.framework.timing import Phases, process_seconds

PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
#: XLA options for programs that run once (parameter initialization) on the CPU backend: no LLVM optimization.
#: With JAX's default partitionable threefry, LLVM's optimizer takes most of the CPU compile of an init program
#: (a width-4 YOLOv3: ~35 s -> ~3 s); the run time of a one-off program does not matter. Values agree up to
#: rounding (unoptimized code does not fuse multiply-adds into FMAs; normal draws differ by <= 3 ulp). Other
#: backends keep their defaults (their init compiles are fast, and their numbers stay as they were).
RUN_ONCE = {"xla_backend_optimization_level": 0}
#: Training images a :class:`~prism.framework.api.DataInitialized` model sees at initialization.
DATA_INIT_EXAMPLES = 5000


def run_once_options() -> dict | None:
    return RUN_ONCE if jax.default_backend() == "cpu" else None


class System(nnx.Module):
    """What is trained: the model and the objective (with any trainable parts the objective owns)."""

    def __init__(self, model: nnx.Module, objective: nnx.Module) -> None:
        self.model = model
        self.objective = objective


def build_plugin(registry, section: DictConfig, optional: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Build ``section``'s plugin with ``kwargs``, plus those of ``optional`` its builder declares."""
    entry = registry.get(section.name)
    if optional:
        params = inspect.signature(entry.builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs.update({k: v for k, v in optional.items() if takes_any or k in params})
    if entry.config is None:
        return entry.builder(**kwargs)
    return entry.builder(plugin_config(section), **kwargs)


def set_compute_dtype(system: nnx.Module, dtype) -> None:
    """Make every flax layer compute in ``dtype`` (their ``dtype`` attribute; parameters and BatchNorm
    statistics keep their float32 storage). Without it a layer infers its dtype by promotion, and
    BatchNorm's float32 running statistics promote the activations back to float32."""
    for _, module in nnx.iter_modules(system):
        if hasattr(module, "dtype") and hasattr(module, "param_dtype"):
            module.dtype = dtype


def run_length(cfg: DictConfig, train_size: int) -> tuple[int, float]:
    """``(optimizer updates in the run, micro-steps (batches) per epoch)`` from ``train.steps`` or
    ``train.epochs``: two units, named apart (an update is ``train.grad_accum_steps`` micro-steps)."""
    t = cfg.train
    steps_per_epoch = train_size / (t.batch_size * t.grad_accum_steps)
    updates = t.steps if t.steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    if updates <= 0:
        raise ConfigError(f"the run has no steps: train.steps={t.steps}, train.epochs={t.epochs}")
    return updates, train_size / t.batch_size


def has_checkpoint_to_resume(cfg: DictConfig, checkpoints: Path | None) -> bool:
    """Whether a run in ``checkpoints`` (its checkpoint directory) would resume from a saved step."""
    ckpt = cfg.checkpoint
    return bool(checkpoints is not None and ckpt.enabled and ckpt.resume and checkpoints.is_dir()
                and any(p.name.isdigit() for p in checkpoints.iterdir()))


class Run:
    """The parts of a run built from ``cfg``: mesh, data, task, model + objective, optimizer and state."""

    def __init__(self, cfg: DictConfig, *, initialize: bool = True, checkpoints: Path | None = None) -> None:
        """``initialize=False`` skips computing the initial weights (``state`` stays None, ``abstract_state``
        describes it) for callers that restore a checkpoint next. ``checkpoints``: the directory a training run
        resumes from; when it holds a step, neither pretrained weights nor data-fitted layers are computed."""
        self.cfg = cfg
        self.startup_s = process_seconds()
        self.phases = Phases()
        if cfg.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
        self.compute_dtype = PRECISIONS[cfg.precision]
        parallel.maybe_initialize_distributed(cfg.parallel.distributed)
        self.is_main = jax.process_index() == 0
        self.mesh = parallel.make_mesh(cfg.parallel.fsdp)
        with self.phases("prepare"):
            self._open_data(decode=initialize)
        self.task = self.build_task(cfg.task)
        t = cfg.train
        self.accum = t.grad_accum_steps
        self.updates, self.steps_per_epoch = run_length(cfg, len(self.train_split))
        self.micro_steps = self.updates * self.accum
        self.eval_every = t.eval_every or max(1, round(self.steps_per_epoch))
        self.host = parallel.host_batch_slice(t.batch_size, self.mesh)
        self.eval_batch_size = t.eval_batch_size or t.batch_size
        self.eval_host = parallel.host_batch_slice(self.eval_batch_size, self.mesh)
        self.optimizer = build_optimizer(cfg, updates=self.updates)
        self.resuming = has_checkpoint_to_resume(cfg, checkpoints)
        with self.phases("init"):
            self._build_state(initialize)

    # -- data -----------------------------------------------------------------------------------
    def _open_data(self, decode: bool) -> None:
        cfg = self.cfg
        self.source: DataSource = apply_one_class(build_plugin(DATASETS, cfg.dataset), cfg.dataset,
                                                  threads=read_threads(cfg.loader.threads))
        self.info: DataInfo = self.source.info
        self.train_split = self.source.split(cfg.dataset.train_split)
        self.eval_split = self.source.split(cfg.dataset.eval_split)
        self.placement = choose_placement(cfg.loader.placement, [self.train_split, self.eval_split],
                                          cfg.loader.device_memory_fraction)
        self._resident: dict[str, ResidentSplit] = {}  # split name -> its examples on the devices
        if self.placement == "device" and decode:  # before init: a data-fitted model reads them there
            self.resident(cfg.dataset.train_split)
            self.resident(cfg.dataset.eval_split)

    def split(self, name: str):
        """The dataset's split called ``name`` (the training and evaluation splits opened once)."""
        if name == self.cfg.dataset.train_split:
            return self.train_split
        if name == self.cfg.dataset.eval_split:
            return self.eval_split
        return self.source.split(name)

    def resident(self, split_name: str) -> ResidentSplit:
        """The split named ``split_name`` on the devices (``loader.placement=device``), decoded once."""
        if split_name not in self._resident:
            what = "training" if split_name == self.cfg.dataset.train_split else f"{split_name!r}"
            self._resident[split_name] = ResidentSplit(self.split(split_name), self.mesh,
                                                       threads=self.cfg.loader.threads, what=what)
        return self._resident[split_name]

    def build_task(self, section: DictConfig) -> Task:
        """The task of config ``section`` (a ``task`` node) for this run's dataset."""
        return build_plugin(TASKS, section, data=self.info)

    def check_task(self, task: Task, task_name: str, split_name: str, split=None) -> None:
        """A one-line ConfigError when ``task`` cannot run on this model or on the split's examples: a member
        of its ``model_contract`` the model lacks, or a key of its ``batch_keys`` the examples lack.
        ``split``: the examples when they are not this run's dataset's ``split_name``."""
        self._check_contract(task.model_contract, f"task {task_name!r}")
        split = self.split(split_name) if split is None else split
        if not len(split):
            return
        keys = set(split[0])
        missing = [k for k in task.batch_keys if k not in keys]
        if missing:
            raise ConfigError(f"task {task_name!r} needs examples with {', '.join(missing)}; dataset "
                              f"{self.cfg.dataset.name!r} (split {split_name!r}) gives {', '.join(sorted(keys))}: "
                              f"choose a task for this data, or a dataset for this task")

    def _check_contract(self, contract: type | None, who: str) -> None:
        if contract is None:
            return
        missing = missing_members(self.abstract_system.model, contract)
        if missing:
            raise ConfigError(f"{who} needs a model with {', '.join(missing)} ({contract.__name__}); model "
                              f"{self.cfg.model.name!r} ({type(self.abstract_system.model).__name__}) has not")

    # -- model and state ------------------------------------------------------------------------
    def create_system(self, key: jax.Array) -> System:
        """The model and objective, freshly initialized from ``key``."""
        rngs = nnx.Rngs(key)
        model = build_plugin(MODELS, self.cfg.model, data=self.info, rngs=rngs)
        objective = build_plugin(OBJECTIVES, self.cfg.objective, {"total_steps": self.micro_steps}, model=model,
                                 data=self.info, rngs=rngs)
        return System(model, objective)

    def _build_state(self, initialize: bool) -> None:
        """Create parameters and optimizer state directly with their shardings (no host copy); without
        ``initialize`` only their abstract description (shapes, dtypes, shardings)."""
        key = jax.random.key(self.cfg.seed)
        abstract_system = nnx.eval_shape(lambda: self.create_system(key))
        if self.compute_dtype != jnp.float32:
            set_compute_dtype(abstract_system, self.compute_dtype)
        parallel.set_batch_stats(abstract_system, self.cfg.parallel.batch_stats, self.mesh)
        self.graphdef, _, _ = nnx.split(abstract_system, nnx.Param, ...)
        abstract_system.eval()
        self.eval_graphdef, _, _ = nnx.split(abstract_system, nnx.Param, ...)
        #: the model and objective as built, with abstract arrays (what contracts are checked against)
        self.abstract_system = abstract_system
        self._check_contract(abstract_system.objective.model_contract, f"objective {self.cfg.objective.name!r}")
        self.check_task(self.task, self.cfg.task.name, self.cfg.dataset.eval_split)
        tx, use_ema = self.optimizer.tx, self.cfg.train.ema_decay > 0

        def init(k: jax.Array) -> TrainState:
            _, params, rest = nnx.split(self.create_system(k), nnx.Param, ...)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                              opt_state=tx.init(params), ema_params=params if use_ema else None,
                              bad_step=jnp.full((), -1, jnp.int32), bad_steps=jnp.zeros((), jnp.int32))

        abstract = jax.eval_shape(init, key)
        self.state_shardings = parallel.state_shardings(self.mesh, abstract)
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract, self.state_shardings)
        self.param_count = sum(x.size for x in jax.tree.leaves(self.abstract_state.params))
        check_model_fits(self.eval_graphdef, abstract.params, abstract.rest, tuple(self.info.image_shape),
                         self.cfg.model.name)
        self.state: TrainState | None = None
        self.pretrained: ImportReport | None = None
        if initialize:
            self.state = jax.jit(init, out_shardings=self.state_shardings, compiler_options=run_once_options())(key)
            self.pretrained = self._load_pretrained()
            if self.pretrained is None and not self.resuming:
                self._fit_to_data()

    def _with_system(self, system: System) -> None:
        """Put ``system``'s (changed) weights back into the state, with their shardings."""
        _, params, rest = nnx.split(system, nnx.Param, ...)
        self.state = self.state._replace(params=jax.device_put(params, self.state_shardings.params),
                                         rest=jax.device_put(rest, self.state_shardings.rest))

    def _load_pretrained(self) -> ImportReport | None:
        """Fill the model with ``model.pretrained`` weights (a weight file or a prism run, see
        :mod:`prism.framework.pretrained`), then start the optimizer (and parameter EMA) from them."""
        path = self.cfg.model.get("pretrained", "")
        if not isinstance(path, str) or not path or self.resuming:
            return None  # a resumed run takes its weights from its own checkpoint (the file may be gone by then)
        system = nnx.merge(self.graphdef, self.state.params, self.state.rest, copy=True)
        report = load_pretrained(system.model, self.cfg.model.name, path)
        if isinstance(system.objective, CopiesModelWeights):  # e.g. BYOL's target starts as the loaded network
            system.objective.copy_model_weights(system.model)
        self._with_system(system)
        opt_state = jax.jit(self.optimizer.tx.init, out_shardings=self.state_shardings.opt_state,
                            compiler_options=run_once_options())(self.state.params)
        ema = self.state.params if self.state.ema_params is not None else None
        self.state = self.state._replace(opt_state=opt_state, ema_params=ema)
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
        self._with_system(system)
        if self.state.ema_params is not None:
            self.state = self.state._replace(ema_params=self.state.params)


__all__ = ["DATA_INIT_EXAMPLES", "PRECISIONS", "RUN_ONCE", "Run", "System", "build_plugin",
           "has_checkpoint_to_resume", "run_once_options", "run_length", "set_compute_dtype"]

"""Devices and shardings: one code path for one CPU, eight GPUs or a multi-host pod.

The mesh has axes ``("data", "fsdp")``. The batch is sharded over both (every device sees a distinct
slice of the global batch); parameters are replicated, or, with ``fsdp > 1``, each parameter's
largest divisible dimension is sharded over ``fsdp``. XLA inserts the gradient all-reduce and the
parameter all-gathers. Multi-host runs call :func:`maybe_initialize_distributed` first; every host
then feeds its own slice of the global batch (:func:`host_batch_slice`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from prism.framework.errors import ConfigError
from prism.framework.layers import BatchNorm

DATA_AXES = ("data", "fsdp")
BATCH_STATS = ("global", "per_device")

log = logging.getLogger("prism")

#: A generic launcher describes the processes with these (JAX itself reads only the address).
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = (
    "JAX_COORDINATOR_ADDRESS", "PRISM_NUM_PROCESSES", "PRISM_PROCESS_ID")


#: What ``srun`` sets in each task and JAX's SLURM detection reads; ``salloc``/``sbatch`` shells lack some of
#: them, so a plain ``prism train`` there stays one process instead of waiting for absent peers.
SLURM_TASK_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


#: XLA flags the ``prism`` command adds to ``XLA_FLAGS`` unless the variable already sets them: JAX's GPU
#: performance guide recommends the latency-hiding scheduler, which lets XLA overlap the gradient all-reduce
#: with the backward pass (ignored by the CPU backend). Measured in benchmarks/RESULTS.md (data-parallel scaling).
DEFAULT_XLA_FLAGS = {"--xla_gpu_enable_latency_hiding_scheduler": "true"}


def apply_default_xla_flags(environ: dict | None = None) -> str:
    """Add :data:`DEFAULT_XLA_FLAGS` that ``XLA_FLAGS`` does not already set (any value the user gave wins);
    returns the new value. Must run before JAX initializes its backends (the CLI calls it first)."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "").split()
    given = {f.split("=", 1)[0] for f in flags}
    flags += [f"{name}={value}" for name, value in DEFAULT_XLA_FLAGS.items() if name not in given]
    environ["XLA_FLAGS"] = " ".join(flags)
    return environ["XLA_FLAGS"]


def _env_describes_multiprocess() -> bool:
    if int(os.environ.get(NUM_PROCESSES_ENV, "1")) > 1:
        return True
    return all(v in os.environ for v in SLURM_TASK_ENV) and int(os.environ["SLURM_NTASKS"]) > 1


def env_process_index() -> int:
    """This process's rank as the environment gives it before JAX is initialized (``PRISM_PROCESS_ID``, or
    SLURM's or Open MPI's rank in a multi-process job); 0 for a single process."""
    if os.environ.get(NUM_PROCESSES_ENV):
        return int(os.environ.get(PROCESS_ID_ENV) or 0)
    if _env_describes_multiprocess():
        return int(os.environ.get("SLURM_PROCID") or 0)
    return int(os.environ.get("OMPI_COMM_WORLD_RANK") or 0)


def _slurm_local_device_ids() -> list[int] | None:
    """Under SLURM with one task per node, all of the node's GPUs; otherwise None (JAX's default).

    JAX's SLURM detection gives each process the single device ``SLURM_LOCALID`` (right for one task per
    GPU, where every task sees all of the node's GPUs); with one task per node that would leave all but
    one GPU idle.
    """
    if "SLURM_JOB_ID" not in os.environ or os.environ.get(NUM_PROCESSES_ENV):
        return None
    nodes = int(os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    if int(os.environ.get("SLURM_NTASKS", "1")) != nodes:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = len([d for d in visible.split(",") if d.strip()]) if visible else int(
        os.environ.get("SLURM_GPUS_ON_NODE") or 0)
    return list(range(count)) if count > 1 else None


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Call ``jax.distributed.initialize()`` when asked to, or (``auto``) when the environment says so.

    Reads the coordinator from ``JAX_COORDINATOR_ADDRESS``/``PRISM_NUM_PROCESSES``/``PRISM_PROCESS_ID``
    when set, otherwise lets JAX detect the cluster (SLURM, Open MPI, Kubernetes, ...). Under SLURM, one
    task per GPU (each task seeing all of the node's GPUs) or one task per node both work
    (:func:`_slurm_local_device_ids`). Returns whether it initialized. Must run before anything touches
    a device.
    """
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"parallel.distributed must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off" or (mode == "auto" and not _env_describes_multiprocess()):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if os.environ.get(NUM_PROCESSES_ENV):
        missing = [v for v in (COORDINATOR_ENV, PROCESS_ID_ENV) if not os.environ.get(v)]
        if missing:
            raise ConfigError(f"{NUM_PROCESSES_ENV} is set but {', '.join(missing)} is not")
        kwargs = dict(
            coordinator_address=os.environ[COORDINATOR_ENV],
            num_processes=int(os.environ[NUM_PROCESSES_ENV]),
            process_id=int(os.environ[PROCESS_ID_ENV]),
        )
    elif (local := _slurm_local_device_ids()) is not None:
        kwargs = dict(local_device_ids=local)
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (all devices of all processes by default)."""
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise ConfigError(
            f"parallel.fsdp={fsdp} must be a positive divisor of the number of devices ({len(devices)})"
        )
    grid = np.array(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading axis split over every device of the mesh."""
    return NamedSharding(mesh, P(DATA_AXES))


def steps_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of several steps' batches stacked on a leading step axis: the batch axis (the second) split
    over every device of the mesh."""
    return NamedSharding(mesh, P(None, DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Replicated, or with FSDP the largest dimension divisible by the ``fsdp`` size sharded over it."""
    size = mesh.shape["fsdp"]
    if size == 1 or not shape:
        return replicated(mesh)
    candidates = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
    if not candidates:
        return replicated(mesh)
    axis = max(candidates, key=lambda i: shape[i])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return NamedSharding(mesh, P(*spec))


def state_shardings(mesh: Mesh, abstract_state):
    """Shardings for every leaf of an (abstract) train state."""
    return jax.tree.map(lambda x: param_sharding(mesh, tuple(x.shape)), abstract_state)


@dataclass(frozen=True)
class HostSlice:
    """Which part of each global batch this process loads."""

    index: int
    count: int
    per_host_batch: int


def host_batch_slice(global_batch: int, mesh: Mesh) -> HostSlice:
    """This host's share of a global batch; checks that the batch divides over devices and hosts."""
    n_devices = mesh.devices.size
    if global_batch % n_devices:
        raise ConfigError(
            f"batch size {global_batch} must be divisible by the number of devices ({n_devices}); "
            f"use a multiple of {n_devices}"
        )
    count = jax.process_count()
    return HostSlice(jax.process_index(), count, global_batch // count)


def global_batch(mesh: Mesh, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble each host's NumPy batch into global arrays sharded over the mesh's batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in host_batch.items()}


def valid_outputs(outputs: Any, valid: np.ndarray) -> Any:
    """A batch's per-example ``outputs`` (a pytree of global arrays) as NumPy, on every host, without the
    examples whose ``valid`` (this host's mask) is False: the padding of an evaluation's last batch."""
    if jax.process_count() > 1:
        outputs = multihost_utils.process_allgather(outputs, tiled=True)
        valid = multihost_utils.process_allgather(valid, tiled=True)
    keep = np.asarray(valid, bool)
    return jax.tree.map(lambda v: np.asarray(v)[keep], outputs)


def set_batch_stats(module: nnx.Module, mode: str, mesh: Mesh) -> list[str]:
    """Apply ``parallel.batch_stats`` to every :class:`prism.framework.layers.BatchNorm` in ``module``: ``per_device``
    gives each one as many statistics groups as the batch has data shards (``global``: one group).

    Returns the paths of plain ``nnx.BatchNorm`` layers, which keep global statistics either way (logged as a
    warning under ``per_device`` on several devices)."""
    if mode not in BATCH_STATS:
        raise ConfigError(f"parallel.batch_stats must be one of {', '.join(BATCH_STATS)}, got {mode!r}")
    groups = mesh.size if mode == "per_device" else 1
    plain = []
    for path, layer in nnx.iter_modules(module):
        if isinstance(layer, BatchNorm):
            layer.stat_groups = groups
        elif isinstance(layer, nnx.BatchNorm):
            plain.append("/".join(map(str, path)))
    if plain and groups > 1:
        log.warning("parallel.batch_stats=per_device: %d BatchNorm layer(s) are plain nnx.BatchNorm and keep "
                    "global statistics (build them with prism.framework.layers.BatchNorm): %s", len(plain),
                    ", ".join(plain[:5]) + (" ..." if len(plain) > 5 else ""))
    return plain

"""A Run's compiled training programs and the calls that feed them: what ``prism train`` and ``prism bench
train`` run, without the loop around them (logging, evaluation, checkpoints: :mod:`prism.framework.train`).

Two feeds: the host path (a grain iterator decodes and batches on the host; one step per call) and the device
path (the splits live on the devices, decoded once; each call runs up to ``steps_per_call`` steps, gathering
every batch by index inside the program, so the host only sends the indices).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from prism.framework import parallel
from prism.framework.augment import Pipeline
from prism.framework.data import train_iterator
from prism.framework.device_prefetch import DevicePrefetcher
from prism.framework.errors import ConfigError
from prism.framework.resident import train_index_stream
from prism.framework.run import Run
from prism.framework.steps import make_train_step, multi_step

#: Training steps per call on the device path when ``train.steps_per_call`` is 0 (a call also ends at every
#: evaluation and checkpoint); enough that dispatch and the host's bookkeeping vanish beside the steps.
AUTO_STEPS_PER_CALL = 64


def steps_per_call(run: Run) -> int:
    """``train.steps_per_call``, or its automatic value: 1 on the host path (each batch comes from the host
    anyway), on the device path ``AUTO_STEPS_PER_CALL`` capped by the run's length."""
    asked = run.cfg.train.steps_per_call
    if run.placement != "device":
        if asked > 1:
            raise ConfigError(f"train.steps_per_call={asked} needs the examples on the device "
                              f"(loader.placement=device); the host path runs one step per call")
        return 1
    return min(asked or AUTO_STEPS_PER_CALL, run.micro_steps)


class TrainPrograms:
    """The jitted training step of ``run`` (``step``: one batch in, the state donated) and, on the device path,
    the several-steps program (``steps``) of up to ``steps_per_call`` steps."""

    def __init__(self, run: Run) -> None:
        cfg, info = run.cfg, run.info
        self.run = run
        pipeline = Pipeline.from_config(cfg.augment.ops, mean=info.mean, std=info.std)
        views = [Pipeline.from_config(ops, mean=info.mean, std=info.std, where=f"augment.views[{i}]")
                 for i, ops in enumerate(cfg.augment.views)]
        step = make_train_step(run.graphdef, run.optimizer, info, dtype=run.compute_dtype, seed=cfg.seed,
                               accum=run.accum, ema_decay=cfg.train.ema_decay, pipeline=pipeline,
                               view_pipelines=views, epoch_length=len(run.train_split))
        outputs = (run.state_shardings, parallel.replicated(run.mesh))
        self.step = jax.jit(step, donate_argnums=0, out_shardings=outputs)
        self.steps_per_call = steps_per_call(run)
        several = multi_step(step, max_steps=self.steps_per_call, batch_sharding=parallel.batch_sharding(run.mesh))
        self.steps = jax.jit(several, donate_argnums=0, out_shardings=outputs)

    def calls(self) -> tuple[Any, Callable[[int], dict]]:
        """``(checkpointable data iterator, call)``: ``call(count)`` runs the next ``count`` training steps on
        ``run.state`` and returns their logs, still on the device (``[steps_per_call]`` rows per name when
        ``steps_per_call`` > 1, else one step's values; ``count`` is then 1). The several-step program is
        compiled here (in the ``compile`` phase), the one-step program by its first call."""
        run = self.run
        if run.placement != "device":
            return self._host_calls()
        cfg, t = run.cfg, run.cfg.train
        with run.phases("prepare"):  # kept on the devices already, unless built without initializing
            resident = run.resident(cfg.dataset.train_split)
            run.resident(cfg.dataset.eval_split)  # decoded now: in prepare_s, not in the first evaluation
        stream = train_index_stream(run.train_split, global_batch=t.batch_size, host=run.host, seed=cfg.seed,
                                    shuffle=cfg.loader.shuffle)
        if self.steps_per_call == 1:  # one step per call: the host path's very program, on a batch gathered apart

            def gather_call(count: int) -> dict:
                run.state, logs = self.step(run.state, resident.batch(next(stream)))
                return logs

            return stream, gather_call

        def indices(count: int) -> jax.Array:
            block = np.zeros((self.steps_per_call, run.host.per_host_batch), np.int32)  # rows past count: unread
            block[:count] = stream.take(count)
            return resident.step_indices(block)

        with run.phases("compile"):
            compiled = self.steps.lower(run.state, resident.arrays, indices(0), np.int32(0)).compile()

        def device_call(count: int) -> dict:
            run.state, logs = compiled(run.state, resident.arrays, indices(count), np.int32(count))
            return logs

        return stream, device_call

    def _host_calls(self) -> tuple[Any, Callable[[int], dict]]:
        run, cfg = self.run, self.run.cfg
        with run.phases("prepare"):
            data_iter = train_iterator(run.train_split, global_batch=cfg.train.batch_size, host=run.host,
                                       seed=cfg.seed, shuffle=cfg.loader.shuffle, workers=cfg.loader.workers,
                                       threads=cfg.loader.threads, prefetch=cfg.loader.prefetch)
        to_devices = functools.partial(parallel.global_batch, run.mesh)
        if cfg.loader.device_prefetch > 0:  # read and copied ahead, while the devices run the step before
            data_iter = DevicePrefetcher(data_iter, to_devices, depth=cfg.loader.device_prefetch)
            to_devices = None

        def host_call(count: int) -> dict:
            batch = next(data_iter)
            run.state, logs = self.step(run.state, batch if to_devices is None else to_devices(batch))
            return logs

        return data_iter, host_call


__all__ = ["AUTO_STEPS_PER_CALL", "TrainPrograms", "steps_per_call"]

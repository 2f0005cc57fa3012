"""One job of a ``hydra/launcher=prism processes=true`` sweep, in its own process:
``python -m hydra_plugins.prism_launcher.worker JOB.pkl RETURN.pkl``.

``JOB.pkl`` holds (Hydra context, the job's composed config, the task function, Hydra's singleton state),
pickled by the launcher; the job's ``JobReturn`` is pickled to ``RETURN.pkl`` (an exception outside the task,
e.g. a job directory that cannot be created, as a failed ``JobReturn``). A process that dies writes nothing,
and the launcher records why.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cloudpickle
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra_plugins.prism_launcher import run_one


def main(payload: str, answer: str) -> int:
    setup_globals()
    hydra_context, sweep_config, task_function, singleton_state = cloudpickle.loads(Path(payload).read_bytes())
    Singleton.set_state(singleton_state)
    try:
        ret = run_one(hydra_context, sweep_config, task_function)
    except Exception as exc:
        ret = JobReturn(overrides=list(sweep_config.hydra.overrides.task), status=JobStatus.FAILED)
        ret.return_value = exc
    try:
        data = cloudpickle.dumps(ret)
    except Exception as exc:  # an unpicklable return value or exception: keep the reason as text
        fallback = JobReturn(overrides=ret.overrides, status=JobStatus.FAILED)
        fallback.return_value = RuntimeError(f"{type(exc).__name__} pickling the job's return: {exc}")
        data = cloudpickle.dumps(fallback)
    Path(answer).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

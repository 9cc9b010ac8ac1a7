"""Hydra callbacks of the project (``conf/hydra/default.yaml`` installs them)."""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback

log = logging.getLogger("mmprune_exp")


class FailSubmititTaskOnError(Callback):
    """Make a task that raised end as a failure for SLURM too.

    In a multirun Hydra catches the task function's exception and hands it back inside the ``JobReturn``
    (hydra#1928), so under hydra-submitit-launcher the task process exits 0 and SLURM records COMPLETED for a
    job that crashed. Under submitit (``SUBMITIT_EXECUTOR`` is set in its tasks) the exception is raised again
    after Hydra's bookkeeping: submitit stores the traceback for the launcher, the task exits non-zero and SLURM
    records FAILED. User errors (exit 2) and signals (143/130) leave as ``SystemExit``, which Hydra never caught.
    Local sweeps (the basic launcher) are left as Hydra runs them.
    """

    def on_job_end(self, config: Any, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED and os.environ.get("SUBMITIT_EXECUTOR"):
            error = job_return._return_value
            log.error("task failed under submitit (%s): %s", os.environ["SUBMITIT_EXECUTOR"], error)
            raise error

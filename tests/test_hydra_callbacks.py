"""The callback that makes a crashed SLURM task end FAILED rather than COMPLETED."""

from __future__ import annotations

import pytest
from hydra.core.utils import JobReturn, JobStatus

from mmprune_exp.hydra_callbacks import FailSubmititTaskOnError


def returned(status: JobStatus, value) -> JobReturn:
    ret = JobReturn()
    ret.status, ret._return_value = status, value
    return ret


def test_a_failed_task_raises_again_under_submitit(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    with pytest.raises(RuntimeError, match="boom"):
        FailSubmititTaskOnError().on_job_end(None, returned(JobStatus.FAILED, RuntimeError("boom")))


def test_successful_tasks_and_local_sweeps_are_left_alone(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    FailSubmititTaskOnError().on_job_end(None, returned(JobStatus.COMPLETED, 1.0))
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    FailSubmititTaskOnError().on_job_end(None, returned(JobStatus.FAILED, RuntimeError("boom")))

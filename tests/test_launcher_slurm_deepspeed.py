"""DeepSpeed ZeRO-2 through the launcher on the real devcluster: a 2-node job preempted by a higher-priority
partition checkpoints collectively, is requeued, resumes and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.factories import final_weights, launcher_job_dict
from tests.slurm_helpers import sacct_state, sbatch
from tests.test_launcher_slurm import (
    STEPS,
    assert_completed_after_requeue,
    cli,
    cluster,  # noqa: F401 - the module's devcluster fixture
    stop_checkpoint,
    submit,
    task_log,
    wait_step,
)
from tests.train_helpers import ROOT

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.slurm, pytest.mark.deepspeed]


@pytest.fixture(scope="module", autouse=True)
def extensions_cache():
    """DeepSpeed compiles its shared-memory op on first start; every task (sbatch exports the environment)
    and the local reference keep it across runs."""
    previous = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(ROOT / ".cache" / "torch_extensions")
    yield
    if previous is None:
        os.environ.pop("TORCH_EXTENSIONS_DIR", None)
    else:
        os.environ["TORCH_EXTENSIONS_DIR"] = previous


@pytest.fixture(scope="module")
def zero2_job(tmp_path_factory, launcher_shards) -> Path:
    """The launcher tests' job (2 nodes x 1 task, STEPS steps, checkpoints every 10) under DeepSpeed ZeRO-2."""
    path = tmp_path_factory.mktemp("jobs") / "zero2.yaml"
    job = launcher_job_dict(
        launcher_shards,
        train={"max_steps": STEPS, "grad_clip": 1.0},
        parallel={"strategy": "deepspeed", "zero_stage": 2},
    )
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def zero2_reference(zero2_job, tmp_path_factory) -> dict:
    """The uninterrupted run: the same job with --local and 2 processes."""
    runs_dir = tmp_path_factory.mktemp("reference")
    assert cli("submit", zero2_job, "--local", "--nproc", "2", "--runs-dir", runs_dir, "--name", "ref") == 0
    return final_weights(runs_dir / "ref")


def test_zero2_partition_preemption_resumes_bit_identical(cluster, zero2_job, zero2_reference, tmp_path):  # noqa: F811
    job_id, run_dir = submit(zero2_job, tmp_path / "runs", "zero2-preempted")
    wait_step(run_dir, job_id, 5)
    # Both nodes' CPUs, on the partition with the higher priority tier: it preempts the training job.
    urgent = sbatch("-p", "urgent", "-N2", "-c2", "-J", "urgent", "-o", "/dev/null", "--wrap", "sleep 2")
    job = assert_completed_after_requeue(run_dir, job_id, zero2_reference, outcome="requeued")
    assert sacct_state(urgent) == "COMPLETED"
    step, _ = stop_checkpoint(run_dir, job_id)
    assert 5 <= step < STEPS
    assert (
        run_dir / "checkpoints" / f"step-{step:08d}" / "deepspeed"
    ).is_dir()  # the engine's collective save
    log = task_log(run_dir, job_id)
    assert "2 rank(s) on cpu" in log and job["attempts"][0]["nodes"] == "n[1-2]"

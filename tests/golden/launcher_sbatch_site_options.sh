#!/bin/bash

# Parameters
#SBATCH --account=my-project-account
#SBATCH --comment='halo mass, seed 0'
#SBATCH --cpus-per-task=16
#SBATCH --error=<RUN>/submitit/%j_0_log.err
#SBATCH --exclude='gpu[01-02]'
#SBATCH --exclusive
#SBATCH --gres=gpu:a100:4
#SBATCH --gres-flags=enforce-binding
#SBATCH --hint=nomultithread
#SBATCH --job-name=golden
#SBATCH --mail-type=END,FAIL
#SBATCH --mail-user=me@example.org
#SBATCH --nice=10
#SBATCH --nodelist='gpu[10-11]'
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=<RUN>/submitit/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --reservation=maint_0412
#SBATCH --signal=USR2@30
#SBATCH --spread-job
#SBATCH --time=10
#SBATCH --wckey=submitit

# setup
module purge
module load cuda/12.4
module load nccl
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <RUN>/submitit/%j_%t_log.out --error <RUN>/submitit/%j_%t_log.err --kill-on-bad-exit=1 --cpu-bind=cores <PYTHON> -u -m submitit.core._submit <RUN>/submitit


# teardown
status=$?
[ "$status" -eq 0 ] || <PYTHON> -m launcher.recovery <RUN> --name golden --max-requeues 3 --status "$status"
exit "$status"

#!/bin/bash

# Parameters
#SBATCH --account=my-project-account
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=16
#SBATCH --error=<RUN>/submitit/%j_0_log.err
#SBATCH --gres=gpu:4
#SBATCH --job-name=golden
#SBATCH --mem=400G
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=<RUN>/submitit/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR2@180
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
module purge
module load cuda/12.4
module load nccl
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=16

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <RUN>/submitit/%j_%t_log.out --error <RUN>/submitit/%j_%t_log.err --kill-on-bad-exit=1 --cpu-bind=cores <PYTHON> -u -m submitit.core._submit <RUN>/submitit


# teardown
status=$?
[ "$status" -eq 0 ] || <PYTHON> -m launcher.recovery <RUN> --name golden --max-requeues 20 --status "$status"
exit "$status"

#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=1
#SBATCH --error=<RUN>/submitit/%j_0_log.err
#SBATCH --job-name=golden
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=<RUN>/submitit/%j_0_log.out
#SBATCH --partition=debug
#SBATCH --requeue
#SBATCH --signal=USR2@30
#SBATCH --time=10
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <RUN>/submitit/%j_%t_log.out --error <RUN>/submitit/%j_%t_log.err --kill-on-bad-exit=1 <PYTHON> -u -m submitit.core._submit <RUN>/submitit


# teardown
status=$?
[ "$status" -eq 0 ] || <PYTHON> -m launcher.recovery <RUN> --name golden --max-requeues 3 --status "$status"
exit "$status"

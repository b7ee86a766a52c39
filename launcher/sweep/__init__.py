"""``launcher sweep``: a hyperparameter sweep as one Optuna study (a journal file in the sweep directory)
run by one SLURM job array of trial workers, each trial an ordinary run in ``runs/SWEEP/trial-NNNN/``.

spec.py     the sweep file, validated strictly; every space key checked as a ``--set`` would be
samplers.py the sampler and pruner tables
study.py    the sweep directory, the journal study, claiming trials, failing those of dead workers
worker.py   one worker: claim a trial, train it (pruning through :mod:`lenstrain.run.hooks`), tell, repeat
submit.py   ``sweep FILE``: --dry-run, --local workers, or one SLURM array
recover.py  after a worker's step failed (``python -m launcher.recovery SWEEP``): its trial's decision, a run's
report.py   ``sweep report``: best.yaml, trials.csv, Optuna's plots
status.py   the trials table of ``launcher status SWEEP``
"""

"""The run lifecycle, one core for plain runs and sweeps alike (a sweep is a set of ordinary runs, plus the
study that chooses their parameters):

lock.py       the exclusive, reentrant file lock: a run's ``jobs.json``, a sweep's claims
conflict.py   whether a directory is free for a run (or sweep), holds the same one again, or another one
processes.py  local processes: alive or not (``/proc``), started with their output streamed and logged,
              signals passed in, stopped; the data workers capped to the CPUs each process gets
decide.py     the batch step's decision after a failed ``srun``: requeue, or why not; its record
"""

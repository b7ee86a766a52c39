"""One training run, top to bottom: :mod:`.train` (the loop) builds its parts with :mod:`.build`, checks them
before step 1 (:mod:`.preflight`), stops cleanly on a signal (:mod:`.preemption`), calls the user's hooks
(:mod:`.hooks`), logs to TensorBoard (:mod:`.tb`) and measures itself (:mod:`.profiling`, :mod:`.flops`)."""

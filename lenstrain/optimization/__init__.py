"""What training minimises and how: losses and target scaling (:mod:`.losses`), optimizers and schedules
(:mod:`.optimizers`), and the learning-rate range test (:mod:`.lr_find`)."""

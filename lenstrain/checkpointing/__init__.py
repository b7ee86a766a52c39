"""A run on disk: its directory and atomic writes (:mod:`.rundir`), checkpoints and their rotation
(:mod:`.checkpoint`), the state files inside them (:mod:`.stateio`, read through the restricted unpickler of
:mod:`.safepickle`), the space a checkpoint needs (:mod:`.space`) and initial weights from another run
(:mod:`.finetune`, ``model.init_from``)."""

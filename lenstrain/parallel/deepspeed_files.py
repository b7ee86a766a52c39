"""DeepSpeed's checkpoint files written and read through lenstrain's state-file rules.

Imported only once DeepSpeed is in use. Writes go through :func:`~lenstrain.stateio.save_state_file`,
so a full disk raises the OS's error rather than torch's vague one. DeepSpeed's files hold objects of
its own classes and cannot be read with ``weights_only=True``; each is unpickled only if the
checkpoint's ``COMPLETE`` marker lists it with the same size and sha256
(:func:`~lenstrain.stateio.load_listed_pickle`), that is, only files that the run itself wrote.
"""

from __future__ import annotations

from pathlib import Path

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from lenstrain.stateio import DEEPSPEED_DIR, UntrustedFileError, load_listed_pickle, save_state_file


class ListedFilesCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with lenstrain's writes and its listed-files-only reads."""

    def save(self, state_dict, path: str) -> None:
        save_state_file(state_dict, path)

    def load(self, path: str, map_location=None):
        path = Path(path)
        if path.parent.name != DEEPSPEED_DIR:
            raise UntrustedFileError(f"{path}: not inside a checkpoint's {DEEPSPEED_DIR}/ directory")
        return load_listed_pickle(path, path.parent.parent, map_location=map_location)

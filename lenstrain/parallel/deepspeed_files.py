"""DeepSpeed's checkpoint files written and read through lenstrain's state-file rules.

Imported only once DeepSpeed is in use. Writes go through :func:`~lenstrain.stateio.save_state_file`,
so a full disk gives the OS's error rather than torch's vague one, raised once the engine's save
has finished on every rank. DeepSpeed's files hold objects of
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

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.write_error: OSError | None = None

    def save(self, state_dict, path: str) -> None:
        """Write one file. A failure is kept for :meth:`raise_write_error`, not raised: every rank must still
        meet the engine's collectives (its closing barrier) in the same order."""
        if self.write_error is not None:
            return
        try:
            save_state_file(state_dict, path)
        except OSError as exc:
            self.write_error = exc

    def raise_write_error(self) -> None:
        """Raise (and forget) the OSError of a failed write since the last call, if any."""
        error, self.write_error = self.write_error, None
        if error is not None:
            raise error

    def load(self, path: str, map_location=None):
        path = Path(path)
        if path.parent.name != DEEPSPEED_DIR:
            raise UntrustedFileError(f"{path}: not inside a checkpoint's {DEEPSPEED_DIR}/ directory")
        return load_listed_pickle(path, path.parent.parent, map_location=map_location)

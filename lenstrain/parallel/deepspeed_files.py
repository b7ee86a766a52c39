"""DeepSpeed's checkpoint files written and read through lenstrain's state-file rules.

Imported only once DeepSpeed is in use. Writes go through :func:`~lenstrain.checkpointing.stateio.save_state_file`,
so a full disk gives the OS's error rather than torch's vague one, raised once the engine's save
has finished on every rank. DeepSpeed's files hold objects of
its own classes beside the tensors; each is read with ``weights_only=True`` and those classes allowed
(:mod:`lenstrain.checkpointing.safepickle`), and only if the checkpoint's ``COMPLETE`` marker lists it with the same size
and sha256 (:func:`~lenstrain.checkpointing.stateio.load_listed_pickle`), that is, only files that the run itself wrote.
DeepSpeed's own converters unpickle fully: every pickle they will read is scanned first
(:func:`~lenstrain.checkpointing.safepickle.check_pickle_tree`), and a global outside the allowlist is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from lenstrain.checkpointing.safepickle import check_pickle_tree, deepspeed_classes, load_allowlisted
from lenstrain.checkpointing.stateio import (
    DEEPSPEED_DIR,
    UntrustedFileError,
    load_listed_pickle,
    save_state_file,
    verify_checkpoint,
)


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


class AllowlistedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine reading with ``weights_only=True`` and DeepSpeed's classes allowed: for
    the universal layout that :func:`write_universal` converts from a verified checkpoint."""

    def load(self, path: str, map_location=None):
        return load_allowlisted(path, deepspeed_classes(), map_location=map_location or "cpu")


# ------------------------------------------------------------------------------------ another world size


def saved_world_size(step_dir: Path) -> int | None:
    """The data-parallel world size that wrote the ZeRO checkpoint in ``step_dir`` (None without ZeRO files)."""
    files = (Path(step_dir) / DEEPSPEED_DIR).glob("zero_pp_rank_*_mp_rank_*_optim_states.pt")
    ranks = {m.group(1) for path in files if (m := re.match(r"zero_pp_rank_(\d+)_", path.name))}
    return len(ranks) or None


def write_universal(step_dir: Path, out: Path) -> None:
    """Convert the ZeRO checkpoint of ``step_dir`` into DeepSpeed's universal layout in ``out/deepspeed/``: one
    folder per parameter with its fp32 value and optimizer state, whole, which any world size can load.

    DeepSpeed's converter unpickles the files, so ``step_dir`` must first match its ``COMPLETE`` marker.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    problem = verify_checkpoint(step_dir)
    if problem is not None:
        raise UntrustedFileError(
            f"{step_dir}: not a checkpoint as the run wrote it ({problem}); refusing to convert it"
        )
    check_pickle_tree(Path(step_dir) / DEEPSPEED_DIR)  # the converter unpickles fully
    args = argparse.Namespace(
        input_folder=str(Path(step_dir) / DEEPSPEED_DIR),
        output_folder=str(Path(out) / DEEPSPEED_DIR),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # lenstrain's checkpoints do not carry the universal-checkpoint info
    )
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):  # progress bars
        ds_to_universal(args)


def saved_module_state(step_dir: Path) -> dict:
    """The ``module`` state dict in a DeepSpeed checkpoint's model states (buffers whole, under every ZeRO stage)."""
    ckpt = Path(step_dir) / DEEPSPEED_DIR
    candidates = [ckpt / "mp_rank_00_model_states.pt", ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states")
    return load_listed_pickle(path, step_dir, map_location="cpu")["module"]

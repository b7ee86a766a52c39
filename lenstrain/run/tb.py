"""TensorBoard logging, rank 0 only; other ranks get a logger that does nothing."""

from __future__ import annotations

from pathlib import Path

import torch


class TBLogger:
    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Preformatted text (each line indented, so TensorBoard's markdown keeps it as it is)."""
        if self.writer:
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.writer:
            self.writer.add_figure(tag, fig, step, close=True)

    def images(self, tag: str, batch: torch.Tensor, step: int, max_images: int = 16) -> None:
        """A grid of sample images, each stretched to [0, 1] on its own."""
        if not self.writer:
            return
        x = batch[:max_images, :1].float()
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        self.writer.add_images(tag, (x - lo) / (hi - lo).clamp_min(1e-8), step)

    def hparams(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        """The run's hyperparameters with its final metrics (``hparam/<metric>``), recorded at ``step``."""
        if self.writer:
            clean = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".",
                                    global_step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()

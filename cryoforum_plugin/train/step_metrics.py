"""Per-step training metrics kept on the device, read once per log row (the Trainer's only wait for the GPU)."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch


class StepMetrics:
    """The training steps of one log row, kept on the device and read once (``read``), so no step waits for the
    GPU: losses, per-image errors (rad), gradient norms, the steps whose loss was not finite and those whose
    gradient norm was not (their update skipped), and the time spent in one part of each step (``timed``: CUDA
    events on a GPU, wall time elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.losses, self.errs, self.gnorms, self.spans = [], [], [], []
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, err: torch.Tensor, gnorm: torch.Tensor) -> None:
        """One step's () loss, (B,) errors and () gradient norm, device tensors."""
        self.losses.append(loss)
        self.errs.append(err)
        self.gnorms.append(gnorm)
        self.nonfinite += ~torch.isfinite(loss)
        self.skipped += ~torch.isfinite(gnorm)

    @contextlib.contextmanager
    def timed(self):
        """Time the block (GPU time between two CUDA events on a GPU, read at ``read``; wall time on the CPU)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self.device)
            start.record(stream)
            yield
            end.record(stream)
            self.spans.append((start, end))
        else:
            t0 = time.time()
            yield
            self.spans.append(time.time() - t0)

    def read(self) -> dict:
        """The host values (the one wait for the device): 'losses' (S,) and 'gnorms' (S,) float64, 'errs' (S·B,)
        float32 radians, 'nonfinite' (steps whose loss was NaN/inf), 'skipped' (steps whose gradient norm was),
        'timed_s' (seconds in ``timed`` blocks)."""
        def host(values, cat=False):
            return (torch.cat(values) if cat else torch.stack(values)).cpu().numpy() if values else np.zeros(0)

        values = {"losses": host(self.losses).astype(np.float64), "errs": host(self.errs, cat=True),
                  "gnorms": host(self.gnorms).astype(np.float64), "nonfinite": int(self.nonfinite),
                  "skipped": int(self.skipped)}
        for span in self.spans:  # CUDA events: complete once the copies above have waited for the device
            if not isinstance(span, float):
                span[1].synchronize()
        values["timed_s"] = float(sum(s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1e3
                                      for s in self.spans))
        return values

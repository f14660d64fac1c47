"""Stopping on a signal: SIGTERM/SIGINT finish the current step, save and exit 0; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import time

import torch

from . import engine as eng


class StopSignals:
    """Signals within 3 s of the first count as the same request: Ctrl-C reaches the ranks directly AND through the
    deepspeed launcher, which forwards it as SIGTERM a moment later."""

    def __init__(self):
        self.signal: int | None = None
        self._first_at = 0.0

    def install(self) -> None:
        def handler(signum, frame):
            if self.signal is not None and time.monotonic() - self._first_at > 3.0:
                os._exit(128 + signum)
            if self.signal is None:
                self.signal, self._first_at = signum, time.monotonic()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def requested(self, flag: bool = False) -> tuple[bool, bool]:
        """(did any rank get a signal?, is `flag` set on any rank?): one all-reduce per step, so that all ranks stop
        (and save on the time cadence, the flag) at the same step."""
        mine = torch.tensor([0.0 if self.signal is None else float(self.signal), float(flag)])
        any_signal, any_flag = (int(v) for v in eng.all_reduce_max(mine).tolist())
        if any_signal and self.signal is None:
            self.signal = any_signal
        return bool(any_signal), bool(any_flag)

"""Preemption: on SIGTERM (what cluster schedulers send before they kill a job), finish the current optimizer step,
save a checkpoint, and stop training normally, so the process exits 0 and ``resume_from_checkpoint: true``
continues exactly where it stopped.

The signal handler only sets a flag; the decision is taken at the end of a step, where it is agreed over all
processes (a sum over ranks), so every rank saves the same step and stops together and none is left waiting in a
collective. A signal that arrives while a checkpoint is being written stops training right after that checkpoint.
Launchers: ``torchrun`` / ``accelerate launch`` (multi-process) forward SIGTERM to their workers; the
single-process ``accelerate launch`` does not, so signal the whole process group or run ``python recipes/train.py``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM into "save a checkpoint at the end of this step and stop", agreed over all processes.

    Args:
        accelerator: the trainer's accelerator (for the agreement over processes).
        signals: the signals that request preemption.
    """

    def __init__(self, accelerator, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.accelerator = accelerator
        self.signals = signals
        self.requested = False  # this process received a signal
        self.preempted = False  # training stopped early, on every process, right after a checkpoint

    @contextlib.contextmanager
    def catch_signals(self) -> Iterator[None]:
        """Handle ``signals`` while the block runs (training); the previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: SIGTERM will not save a checkpoint first.")
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in self.signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if not self.requested:
            logger.warning("Received %s: finishing the current step, then saving a checkpoint and stopping.",
                           signal.Signals(signum).name)
        self.requested = True  # schedulers may signal the launcher and the workers: repeats change nothing

    def _agreed(self) -> bool:
        """Whether any process was signalled; a collective, so every process calls it at the same point."""
        if self.accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
            self.preempted = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if not self.preempted and self._agreed():  # the signal came while this checkpoint was being written
            control.should_training_stop = True
            self.preempted = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.preempted:
            logger.warning("Preempted: stopped after step %d with a checkpoint in %s. Resume with "
                           "resume_from_checkpoint: true.", state.global_step, args.output_dir)
        return control

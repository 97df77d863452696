"""Save ``last.ckpt`` and exit non-zero when a fit is told to stop (SIGTERM from a scheduler, SIGUSR1 ahead
of a time limit, Ctrl-C).

Why not Lightning's own handling alone: it notes SIGTERM, raises at the next batch or validation batch (where
the EMA weights are swapped in), writes nothing and exits with status 0, so a preempted job looks finished
and loses everything since its last save; SIGUSR1 is handled only under SLURM auto-requeue; and a loader
stuck on data never reaches the next batch. Here the signal is noted, the current step or validation runs to
its end, ``last.ckpt`` is written where :class:`~lightning.pytorch.callbacks.ModelCheckpoint` keeps it, and
the process exits with status 128 + the signal number, as if the signal had ended it (143 for SIGTERM). When
the training loop is waiting for data the wait is abandoned at once: no step is under way, nothing is lost.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: the module of Lightning's batch fetchers: a main thread inside it is waiting for data
FETCHERS = "lightning.pytorch.loops.fetchers"


class Preempted(SIGTERMException):
    """Ends a fit on a stop signal. A ``SIGTERMException`` (so callbacks written for Lightning's SIGTERM react
    to it), with the exit status of a process the signal ended: 128 + its number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def waiting_for_data(frame: FrameType | None) -> bool:
    """Whether the interrupted code is inside Lightning's fetch of the next batch."""
    while frame is not None:
        if frame.f_globals.get("__name__") == FETCHERS and frame.f_code.co_name in ("__next__", "__iter__"):
            return True
        frame = frame.f_back
    return False


class Preemption(Callback):
    """On one of ``signals``: finish the current step (or validation), write ``last.ckpt``, exit 128 + signum.

    Args:
        signals: names of the signals that stop a fit this way. Under SLURM with auto-requeue, Lightning keeps
            its own SIGUSR1 handling (save and requeue the job).
    """

    def __init__(self, signals: list[str] | None = None):
        names = ["SIGTERM", "SIGUSR1", "SIGINT"] if signals is None else list(signals)
        unknown = [n for n in names if not isinstance(getattr(signal, n, None), signal.Signals)]
        if unknown:
            raise ValueError(f"preemption.signals: unknown signal(s) {unknown} on this platform")
        self.signals = [getattr(signal, n) for n in names]
        self.signum: int | None = None
        self._trainer: L.Trainer | None = None
        self._previous: dict[int, object] = {}

    # ---------------------------------------------------------------------------------------------
    # the handler
    # ---------------------------------------------------------------------------------------------

    def _install(self, trainer: L.Trainer) -> None:
        """Replace the handlers (Lightning's SIGTERM one included) once the run is set up; the previous ones
        come back when the run ends."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        environment = trainer._accelerator_connector.cluster_environment
        requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        for signum in self.signals:
            if requeue and signum == environment.requeue_signal:
                continue
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        trainer = self._trainer
        if self.signum is None:
            self.signum = signum
            rank_zero_info(f"{signal.Signals(signum).name}: saving last.ckpt after the current step")
            launcher = trainer.strategy.launcher
            if launcher is not None:  # processes this one started (DDP ranks) get the signal too
                launcher.kill(signum)
        if trainer.world_size == 1 and trainer.training and waiting_for_data(frame):
            raise Preempted(self.signum)

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        """Stop here when any rank got a signal (all ranks decide together, so all of them save)."""
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            raise Preempted(self.signum if self.signum is not None else signal.SIGTERM)

    # ---------------------------------------------------------------------------------------------
    # hooks: install, stop at the end of a step / validation / epoch, save
    # ---------------------------------------------------------------------------------------------

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException):
        self._restore()
        if not isinstance(exception, Preempted):
            return
        checkpointer = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpointer is None or checkpointer.dirpath is None:
            path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        else:
            path = Path(checkpointer.format_checkpoint_name({}, checkpointer.CHECKPOINT_NAME_LAST))
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"{signal.Signals(exception.signum).name}: saved {path} at step {trainer.global_step}; "
            f"resume with --ckpt_path {path}"
        )

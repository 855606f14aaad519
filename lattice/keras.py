"""``lattice.keras.Checkpoint``: a Keras 3 callback that makes ``model.fit`` elastic.

    model.fit(ds, epochs=5, callbacks=[lattice.keras.Checkpoint(every_steps=100)])

At the start of ``fit`` it registers the model, its optimizer, the progress of ``fit`` (epoch
and batch) and any objects passed to it with ``lattice.register`` (which restores the newest
good checkpoint into them), counts each training batch with ``lattice.step()`` (which
checkpoints by policy, or when the agent asks), and checkpoints once more when ``fit`` ends.

Resuming, exactly: if the restored checkpoint was taken after batch ``b`` of epoch ``e``,
``fit`` starts at epoch ``e`` (Keras's own ``initial_epoch`` hook), and the first ``b`` batches
of that epoch are read from the data but not trained on, so training continues with batch
``b + 1`` on the same data as the interrupted run. With ``replay_epochs=True`` the epochs
before ``e`` are read through the same way instead of skipped, for pipelines whose order
depends on how many epochs were iterated (``shuffle(..., reshuffle_each_iteration=True)``).
Importing this module imports keras; ``import lattice`` does not.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import keras

import lattice
from lattice.core.config import Config

log = logging.getLogger("lattice")
_POLICY = tuple(f.name for f in dataclasses.fields(Config))  # every lattice.configure option


class Checkpoint(keras.callbacks.Callback):
    """Checkpoint and resume ``model.fit`` through Lattice.

    Args:
        every_steps, every_seconds, checkpoint_dir, keep, on_busy, capture_rng, restore,
            part_timeout: Lattice options (``lattice.core.config.Config``), passed to
            ``lattice.configure`` when given (otherwise the ``LATTICE_*`` environment applies).
        replay_epochs: on resume, read through the data of the finished epochs (no training)
            instead of starting at the interrupted epoch; exact for reshuffling pipelines.
        save_at_end: checkpoint (and wait for the commit) when ``fit`` returns normally.
        model_name, optimizer_name, progress_name: the names registered for them.
        **objects: more objects to register with them (RNGs, ``tf.data`` iterators, values).
    """

    def __init__(self, *, replay_epochs: bool = False, save_at_end: bool = True,
                 model_name: str = "model", optimizer_name: str = "optimizer",
                 progress_name: str = "fit_progress", **objects: Any):
        super().__init__()
        self._options = {k: objects.pop(k) for k in _POLICY if k in objects}
        self.replay_epochs, self.save_at_end = replay_epochs, save_at_end
        self._names = (model_name, optimizer_name, progress_name)
        self._objects = objects
        self.progress: dict[str, int] = {"epoch": 0, "batch": 0}
        self.state: lattice.State | None = None
        self._skip: tuple[int, int] = (0, 0)  # read, without training, up to (epoch, batch)
        self._epoch = 0
        self._train_function: Any = None

    # -- fit's lifecycle ------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.state is not None:  # a later fit() with the same callback: nothing to resume
            self.progress.update(epoch=0, batch=0)
            self._skip = (0, 0)
            return
        if self._options:
            lattice.configure(**self._options)
        model_name, optimizer_name, progress_name = self._names
        objects: dict[str, Any] = {model_name: self.model}
        if getattr(self.model, "optimizer", None) is not None:
            objects[optimizer_name] = self.model.optimizer
        objects[progress_name] = self.progress
        self.state = lattice.register(**objects, **self._objects)
        self.progress = self.state[progress_name]
        self._plan_resume()

    def _plan_resume(self) -> None:
        epoch, batch = int(self.progress["epoch"]), int(self.progress["batch"])
        self._skip = (0, 0)
        if self.state is None or self.state.restored_from is None or (epoch, batch) == (0, 0):
            return
        log.info("resuming fit at epoch %d after batch %d (step %d)", epoch, batch, self.state.step)
        if not self.replay_epochs:
            self.model._initial_epoch = epoch  # read by fit right after on_train_begin
        self._skip = (epoch, batch)
        if self._skipping(0 if self.replay_epochs else epoch, 0):
            self._train_function = self.model.train_function
            self.model.train_function = self._read_without_training

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self.progress.update(epoch=epoch, batch=0)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        skipped = self._train_function is not None
        self.progress.update(epoch=self._epoch, batch=batch + 1)
        if skipped:
            if not self._skipping(self._epoch, batch + 1):
                self._done_skipping()
            return
        lattice.step()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._train_function is not None and not self._skipping(epoch + 1, 0):
            self._done_skipping()
        if self._train_function is None:
            self.progress.update(epoch=epoch + 1, batch=0)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._done_skipping()
        self.model._initial_epoch = None
        if self.save_at_end and self.state is not None:
            lattice.checkpoint()
            lattice.wait()

    # -- reading through batches that are already trained ----------------------------
    def _skipping(self, epoch: int, batch: int) -> bool:
        """True while the position (epoch, batches done) is before the restored one."""
        return (epoch, batch) < self._skip

    def _read_without_training(self, iterator: Any) -> dict[str, Any]:
        """Stands in for ``model.train_function``: consume one execution's batches, train nothing."""
        for i in range(int(getattr(self.model, "steps_per_execution", 1) or 1)):
            try:
                next(iterator)
            except StopIteration:
                if i == 0:
                    raise  # fit's epoch loop ends the epoch here, as it would have
                break
        return {}

    def _done_skipping(self) -> None:
        if self._train_function is not None:
            self.model.train_function, self._train_function = self._train_function, None
            log.info("caught up with the checkpoint at epoch %d, batch %d: training resumes", *self._skip)

"""What a run prints: a progress line with its speed and ETA at every training log, one line per
evaluation, and none of the libraries' per-call INFO chatter, so that a demo's log fits on a
screen. Every metric still goes to TensorBoard (``jprompt.train.events``)."""

import contextlib
import logging as std_logging
import time

from absl import logging


class Progress:
    """Progress lines of one training call, from ``start_step`` to ``total_steps``.

    The speed is measured from the end of the first step, whose time is mostly compilation.
    """

    def __init__(self, *, start_step: int, total_steps: int, steps_per_epoch: int):
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self._first = start_step + 1
        self._first_done_at = None

    def step_done(self, step: int) -> None:
        if step == self._first:
            self._first_done_at = time.monotonic()

    def steps_per_sec(self, step: int) -> float | None:
        """Steps per second since the first step, or None before there is a second one."""
        if self._first_done_at is None or step <= self._first:
            return None
        return (step - self._first) / max(time.monotonic() - self._first_done_at, 1e-9)

    def log(self, step: int, train: dict[str, float] | None, val: dict[str, float] | None = None):
        """One line: where the run is, its training (and validation) metrics, speed and ETA."""
        epoch, within = divmod(step, self.steps_per_epoch)
        epochs = self.total_steps // self.steps_per_epoch
        parts = [
            f"step {step}/{self.total_steps}" + ("" if within else f" (epoch {epoch}/{epochs})")
        ]
        if train is not None:
            parts.append(f"train loss {train['loss']:.4f}, accuracy {train['accuracy']:.4f}")
        if val is not None:
            parts.append(f"validation loss {val['loss']:.4f}, accuracy {val['accuracy']:.4f}")
        rate = self.steps_per_sec(step)
        if rate is not None:
            eta = format_duration((self.total_steps - step) / rate)
            parts.append(f"{rate:.3g} steps/s, ETA {eta}")
        logging.info("%s", "; ".join(parts))


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _LibraryInfoFilter(std_logging.Filter):
    """Drops the INFO records of tfds (three lines each time a split is opened) and orbax (lines
    per saved file); their warnings and errors pass."""

    LIBRARIES = ("/tensorflow_datasets/", "/orbax/")

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or not any(
            library in record.pathname for library in self.LIBRARIES
        )


@contextlib.contextmanager
def quiet_library_info():
    """Within it, the libraries' INFO chatter is not logged (both log through absl's logger)."""
    absl_logger = logging.get_absl_logger()
    quiet = _LibraryInfoFilter()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)

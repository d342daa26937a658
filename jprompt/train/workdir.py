"""A work directory remembers the config of its run, so that a rerun never mixes two experiments.

The first run writes ``WORKDIR/config.json``. A later run with the same workdir compares its config
with it, field by field, before any work: a run of another config stops with one line listing
the differences, unless only ``OPERATIONAL_FIELDS`` differ or, for an unfinished run,
``config.resume_with_changes`` asks to continue it with the changes on purpose (the replaced
config is then kept as ``config.until_step_<N>.json``, N the step it trained up to). A finished
run (one with ``results.json``) is never continued with another config: its results belong to
the config that produced them.
"""

import json

import jax
from etils import epath

from jprompt.errors import InputError
from jprompt.train import protocols

CONFIG_FILE = "config.json"

# Fields that change how a run is carried out, never what it computes (up to the float
# summation order of metrics): they may differ between a run and its rerun.
OPERATIONAL_FIELDS = frozenset(
    {
        "log_every_steps",  # how often training metrics are logged
        # Evaluation batches are padded and masked: every example counts once at any size.
        "eval_batch_size",
        "dataset.data_dir",  # where the same prepared dataset is read from
        "model_axis_size",  # how the frozen backbone is laid out over the devices
        "backbone.remat",  # recompute activations in the backward pass to save memory
        # keep small splits decoded in memory: the same batches, bit for bit
        "input.cache_decoded",
        "resume_with_changes",  # the request to continue despite differences, not a setting
    }
)
SHOWN_DIFFERENCES = 10  # listed in the error; the rest are counted


def ensure_writable(workdir: str | epath.Path) -> epath.Path:
    """Create ``workdir`` and prove it can be written, before any expensive work starts.

    Each process probes with its own file: processes of one job share the directory.
    """
    workdir = epath.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"work directory {workdir} is not writable: {error}") from error
    return workdir


def differences(saved: dict, current: dict) -> list[str]:
    """``"field: old -> new"`` for every field (dotted name) whose value differs, sorted, leaving
    out ``OPERATIONAL_FIELDS``; a field only one config has shows ``(absent)`` on the other side."""
    saved, current = protocols.flatten(saved), protocols.flatten(current)
    absent = object()
    lines = []
    for field in sorted((saved.keys() | current.keys()) - OPERATIONAL_FIELDS):
        old, new = saved.get(field, absent), current.get(field, absent)
        if old != new:
            lines.append(f"{field}: {_show(old, absent)} -> {_show(new, absent)}")
    return lines


def listing(found: list[str]) -> str:
    """``differences`` for a message: the first ``SHOWN_DIFFERENCES``, the rest counted."""
    listed = "; ".join(found[:SHOWN_DIFFERENCES])
    if len(found) > SHOWN_DIFFERENCES:
        listed += f"; and {len(found) - SHOWN_DIFFERENCES} more"
    return listed


def _show(value, absent) -> str:
    return "(absent)" if value is absent else json.dumps(value)


def check_config(
    workdir: epath.Path, config_json: str, *, finished: bool, resume_with_changes: bool
) -> list[str]:
    """The differences between ``config_json`` and the config saved in ``workdir`` (none when
    nothing is saved yet). Raises an ``InputError`` naming them unless they may be continued:
    an unfinished run with ``resume_with_changes``."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return []
    found = differences(json.loads(path.read_text()), json.loads(config_json))
    if not found or (resume_with_changes and not finished):
        return found
    listed = listing(found)
    if finished:
        raise InputError(
            f"{workdir} holds a finished run of another config (saved in {path}): {listed}. Its "
            f"results stay in {workdir / 'results.json'}; run this config with a fresh --workdir"
        )
    raise InputError(
        f"{workdir} holds an unfinished run of another config (saved in {path}): {listed}. Run "
        "this config with a fresh --workdir, or continue that run with these changes on purpose "
        "with --config.resume_with_changes=True"
    )


def save_config(
    workdir: epath.Path, config_json: str, *, replaced_at_step: int | None
) -> epath.Path | None:
    """Write ``config_json`` as the workdir's config. With ``replaced_at_step`` (a change made on
    purpose), the config it replaces is kept as ``config.until_step_<step>.json``: its path is
    returned."""
    path = workdir / CONFIG_FILE
    kept = None
    if replaced_at_step is not None and path.exists():
        kept = workdir / f"config.until_step_{replaced_at_step}.json"
        path.replace(kept)
    write_json(path, json.loads(config_json))
    return kept


def write_json(path: epath.Path, value) -> None:
    """Written beside, then renamed: a job killed while writing leaves no truncated file (which
    the next run could take for "training complete")."""
    partial = path.parent / f"{path.name}.partial"
    partial.write_text(json.dumps(value, indent=2))
    partial.replace(path)

"""The training loop: ``train_and_evaluate(config, workdir)``.

Data-parallel over every device: batches are global arrays split over all devices of the mesh,
the trainable state is replicated, the frozen backbone is replicated or, with
``config.model_axis_size > 1``, sharded over the mesh's ``model`` axis, and one jitted step updates
only the method's trainable tree. Progress, metrics (TensorBoard + log lines) and orbax
checkpoints go to ``workdir``; running again with the same ``workdir`` resumes from the newest
checkpoint, and because data order, randomness and the schedule are functions of the step, a
resumed run ends exactly where an uninterrupted one would, however the previous one ended:
``max_steps``, SIGTERM (a checkpoint is written first) or SIGKILL (the work since the last
checkpoint is redone).

A linear probe with ``cache_features`` computes each image's backbone features once and trains
its head on them (``jprompt.train.feature_cache``); the loop, checkpoints and selection are the
same.

In a multi-process job (``jprompt.train.distributed``) every process runs this same loop on its own
share of the data; only process 0 writes logs, pictures and results.
"""

import dataclasses
import functools
import json
import signal
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from ml_collections import ConfigDict

from jprompt import methods
from jprompt.data import mixture, pipeline, presets
from jprompt.data.preprocess import PreprocessSpec
from jprompt.methods import zeroshot
from jprompt.methods.base import Method
from jprompt.models import backbones
from jprompt.train import (
    checkpoint,
    compilation,
    config_lib,
    distributed,
    feature_cache,
    optim,
    protocols,
    sharding,
    visualize,
)
from jprompt.train.evaluate import evaluate, make_eval_step
from jprompt.train.metrics import NO_STEP
from jprompt.train.step import make_train_step

RESULTS_FILE = "results.json"
# config.report_test_selected: {step: test accuracy} after every epoch.
TEST_EACH_EPOCH_FILE = "test_each_epoch.json"


@dataclasses.dataclass
class Experiment:
    """Everything a run is made of, before any training step: built by ``create_experiment``.

    Colab users and tests drive ``train_step``/``eval_step`` directly from here. With
    ``features`` (a linear probe's ``cache_features``) the steps take the backbone's features
    in place of images, and ``train_batches``/``eval_batches`` yield them (in the ``"image"``
    key) from the cache.
    """

    config: ConfigDict
    mesh: jax.sharding.Mesh
    method: Method
    frozen: dict
    state: dict
    schedules: dict[str, Callable]
    spec: PreprocessSpec
    steps_per_epoch: int
    total_steps: int
    train_rng: jax.Array
    eval_rng: jax.Array
    train_step: Callable
    eval_step: Callable
    features: feature_cache.FeatureCache | None = None

    def train_batches(self, start_step: int = 0):
        """Host-local training batches, resuming the data order at ``start_step``."""
        data = self.config.dataset
        drop_last = self.config.input.drop_last
        if self.features is not None:
            return feature_cache.train_iterator(
                self.features.get(data.train_split, feature_cache.train_spec(self.spec)),
                global_batch_size=self.config.batch_size,
                seed=self.config.seed,
                start_step=start_step,
                shuffle_buffer=self.config.input.shuffle_buffer,
                steps_per_epoch=None if drop_last else self.steps_per_epoch,
            )
        read = _data_module(data.name).train_iterator
        if mixture.is_mixture(data.name):
            read = functools.partial(read, sampling=data.get("sampling", mixture.SAMPLINGS[0]))
        return read(
            data.name,
            data.train_split,
            global_batch_size=self.config.batch_size,
            spec=self.spec,
            seed=self.config.seed,
            start_step=start_step,
            data_dir=data.data_dir or None,
            shuffle_buffer=self.config.input.shuffle_buffer,
            drop_last=drop_last,
            **self._example_options(),
        )

    def eval_batches(self, split: str):
        if self.features is not None:
            return feature_cache.eval_iterator(
                self.features.get(split, self.spec),
                global_batch_size=self.config.eval_batch_size,
            )
        return self.image_batches(split, self.spec)

    def image_batches(self, split: str, spec: PreprocessSpec):
        """One pass over ``split``'s images preprocessed by ``spec`` (``spec.eval_crop``)."""
        return _data_module(self.config.dataset.name).eval_iterator(
            self.config.dataset.name,
            split,
            global_batch_size=self.config.eval_batch_size,
            spec=spec,
            data_dir=self.config.dataset.data_dir or None,
            **self._example_options(),
        )

    def num_eval_batches(self, split: str) -> int:
        return _data_module(self.config.dataset.name).num_eval_batches(
            self.config.dataset.name,
            split,
            global_batch_size=self.config.eval_batch_size,
            data_dir=self.config.dataset.data_dir or None,
        )

    def _example_options(self) -> dict:
        """How examples become (image, label), and what to do with bad ones."""
        return dict(
            label_map=self.config.dataset.label_map,
            num_classes=self.method.num_classes,
            skip_undecodable=self.config.input.skip_undecodable,
        )

    def evaluate(self, trained, split: str) -> dict[str, float]:
        return evaluate(
            self.eval_step,
            trained,
            self.frozen,
            self.eval_batches(split),
            mesh=self.mesh,
            rng=self.eval_rng,
        )

    @functools.cached_property
    def predict(self) -> Callable:
        """``(trained, batch, index) -> {"logits", "label", "mask", "token_weights"}``, numpy of
        the global batch (``token_weights`` None without a token library), for scores that
        ``eval_step``'s metrics do not give. ``index`` folds into ``eval_rng`` as in
        ``evaluate``. Every process must call it (a collective)."""
        method = self.method

        def forward(trained, frozen, batch, rng):
            logits, aux = method.apply(trained, frozen, batch["image"], rng=rng, train=False)
            return {
                "logits": logits.astype(jnp.float32),
                "label": batch["label"],
                "mask": batch["mask"],
                "token_weights": aux.get("token_weights"),
            }

        jitted = jax.jit(forward, out_shardings=sharding.replicated(self.mesh))

        def predict(trained, batch, index):
            rng = jax.random.fold_in(self.eval_rng, index)
            batch = sharding.to_global_batch(batch, self.mesh)
            return jax.device_get(jitted(trained, self.frozen, batch, rng))

        return predict

    def score_components(self, trained, split: str):
        """A mixture's scores per component on ``split`` and their mean token weights
        (``mixture.score``)."""
        return mixture.score(
            lambda batch, index: self.predict(trained, batch, index),
            self.config.dataset.name,
            split,
            global_batch_size=self.config.eval_batch_size,
            spec=self.spec,
            data_dir=self.config.dataset.data_dir or None,
            skip_undecodable=self.config.input.skip_undecodable,
        )


def _data_module(name: str):
    """What reads dataset ``name``: ``mixture`` for a ``mix/...`` name, else ``pipeline``
    (the same functions)."""
    return mixture if mixture.is_mixture(name) else pipeline


def create_experiment(config: ConfigDict, *, devices: Sequence[jax.Device] | None = None):
    """Build backbone, method, optimizer and jitted steps from ``config`` (no training yet)."""
    if config.selection not in SELECTIONS:
        raise ValueError(f"unknown selection {config.selection!r}; valid choices: {SELECTIONS}")
    mesh = sharding.make_mesh(devices, config.model_axis_size)
    for name, size in (
        ("batch_size", config.batch_size),
        ("eval_batch_size", config.eval_batch_size),
    ):
        if size % mesh.devices.size:
            raise ValueError(
                f"config.{name}={size} is not divisible by the {mesh.devices.size} devices; "
                "choose a multiple of the device count"
            )
    data_dir = config.dataset.data_dir or None
    train_info = _data_module(config.dataset.name).dataset_info(
        config.dataset.name,
        config.dataset.train_split,
        data_dir=data_dir,
        label_map=config.dataset.label_map,
    )
    if config.dataset.num_classes not in (0, train_info.num_classes):
        raise ValueError(
            f"config.dataset.num_classes={config.dataset.num_classes} (preset "
            f"{config.dataset.preset!r}) but {config.dataset.name} has "
            f"{train_info.num_classes} classes: the preset does not fit this dataset. Choose the "
            "dataset with the config arg dataset=NAME, or set config.dataset.num_classes=0"
        )
    # drop_last=False (VPT's loader) also counts the last, partial batch of every epoch.
    steps_per_epoch = pipeline.steps_per_epoch(
        train_info.num_examples,
        config.batch_size,
        drop_last=config.input.drop_last,
        skip_undecodable=config.input.skip_undecodable,
    )
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch size {config.batch_size} is larger than the {train_info.num_examples} "
            f"examples of {config.dataset.name}:{config.dataset.train_split}"
        )
    total_steps = steps_per_epoch * config.num_epochs

    root = jax.random.PRNGKey(config.seed)
    backbone_rng, init_rng, train_rng, eval_rng = jax.random.split(root, 4)
    backbone, backbone_params = backbones.build(
        config.backbone, image_size=config.input.image_size, rng=backbone_rng
    )
    if config.input.normalization:
        # A protocol that feeds a checkpoint other pixels than it was trained on (VPT: ImageNet
        # mean/std into vit_jax weights): the method, pictures and prompt inversion follow it.
        backbone = dataclasses.replace(backbone, normalization=config.input.normalization)
    method_options = {k: v for k, v in config.method.items() if k != "name"}
    method = methods.build(
        config.method.name,
        backbone=backbone,
        num_classes=train_info.num_classes,
        zeroshot=build_zeroshot_head(config, backbone, train_info.class_names),
        **method_options,
    )
    cache = isinstance(method, methods.LinearProbe) and method.cache_features
    trained, frozen = method.init(init_rng, backbone_params)
    tx, schedules = optim.build(
        config.optim, trained["params"], total_steps=total_steps, steps_per_epoch=steps_per_epoch
    )
    state = {
        "step": jnp.zeros((), jnp.int32),
        "trained": trained,
        "opt_state": tx.init(trained["params"]),
    }
    replicated = sharding.replicated(mesh)
    spec = preprocess_spec(config.input, backbone)
    if cache:
        feature_cache.train_spec(spec)  # refuse random augmentation before any work
    step_method = method.on_features() if cache else method
    options = compilation.step_options(mesh.devices.flat[0].platform)
    experiment = Experiment(
        config=config,
        mesh=mesh,
        method=method,
        frozen=jax.device_put(frozen, sharding.frozen_shardings(frozen, mesh)),
        state=jax.device_put(state, replicated),
        schedules=schedules,
        spec=spec,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        train_rng=train_rng,
        eval_rng=eval_rng,
        # The state is donated: its buffers are reused for the next state, halving its memory.
        train_step=jax.jit(
            make_train_step(step_method, tx, steps_per_epoch),
            donate_argnums=(0,),
            out_shardings=(replicated, replicated),
            compiler_options=options,
        ),
        eval_step=jax.jit(
            make_eval_step(step_method), out_shardings=replicated, compiler_options=options
        ),
    )
    if cache:
        forward = jax.jit(
            lambda frozen, images: method.features(frozen, images)[0],
            out_shardings=sharding.batch_sharded(mesh),
        )
        experiment.features = feature_cache.FeatureCache(
            functools.partial(forward, experiment.frozen),
            mesh,
            read=experiment.image_batches,
            num_batches=experiment.num_eval_batches,
        )
    return experiment


def preprocess_spec(inputs: ConfigDict, backbone) -> PreprocessSpec:
    """``config.input`` as the pipeline's spec, normalized as ``backbone`` expects."""
    return PreprocessSpec(
        image_size=inputs.image_size,
        train_crop=inputs.train_crop,
        eval_crop=inputs.eval_crop,
        flip=inputs.flip,
        normalization=backbone.normalization,
        resize=inputs.resize,
        train_resize=inputs.train_resize or None,
        augment=inputs.augment,
    )


HEADS = ("linear", "zeroshot")
SELECTIONS = ("val", "last")


def build_zeroshot_head(config: ConfigDict, backbone, class_names):
    """The frozen zero-shot head when ``config.head.name == "zeroshot"``, else None."""
    if config.head.name not in HEADS:
        raise ValueError(f"unknown head {config.head.name!r}; valid choices: {HEADS}")
    if config.head.name == "linear":
        return None
    preset = presets.get(config.dataset.preset)
    return zeroshot.build_head(
        backbone.text,
        config.head.class_names or preset.clean_class_names(class_names),
        config.head.templates or zeroshot.templates_for(config.dataset.name),
        backbone_name=backbone.name,
        name_rule=config.head.name_rule,
    )


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


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    diffs = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _check_finite(values: dict[str, float], checkpoints: checkpoint.Checkpoints) -> None:
    """Stop at the first non-finite input or loss, naming its step (``values`` are popped)."""
    input_step = int(values.pop("first_nonfinite_input_step"))
    loss_step = int(values.pop("first_nonfinite_loss_step"))
    if input_step != NO_STEP and input_step <= loss_step:
        problem = (
            f"the input images of step {input_step} contain NaN or Inf; check the dataset "
            "and its preprocessing (config.input)"
        )
    elif loss_step != NO_STEP:
        problem = (
            f"the training loss became NaN or Inf at step {loss_step}; lower optim.lr or set "
            "optim.grad_clip_norm"
        )
    else:
        return
    latest = checkpoints.latest_step()
    kept = (
        "no checkpoint was written before it"
        if latest is None
        else f"the last good checkpoint (step {latest}) is kept, and rerunning with the same "
        "workdir resumes from it"
    )
    raise FloatingPointError(f"{problem}. Training stopped; {kept}.")


class _Preemption:
    """SIGTERM, which TPU/GPU schedulers send before taking machines back, as a request to stop
    after the current step with a checkpoint, rather than to die losing the work since the last.

    The handler is installed on entry and the previous one restored on exit. Python runs signal
    handlers only in the main thread, so elsewhere (a notebook's worker thread) nothing is
    installed and SIGTERM keeps its previous meaning.
    """

    def __init__(self):
        self._received = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info):
        if self._installed:
            # None: the previous handler was not installed from Python; the default is the
            # closest Python can restore.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum, frame):
        del signum, frame
        self._received = True  # only a flag: the loop acts on it between steps

    def requested(self) -> bool:
        """Whether any process received SIGTERM; a collective, so all stop at the same step."""
        return distributed.any_process(self._received)


def train_and_evaluate(
    config: ConfigDict,
    workdir: str,
    *,
    devices: Sequence[jax.Device] | None = None,
    max_steps: int | None = None,
) -> dict:
    """Train (or resume) the run described by ``config`` in ``workdir``; return its results.

    Validation runs after every epoch and the best-validation state is kept; at the end the test
    split is evaluated with that state and everything is written to ``workdir/results.json``.
    ``max_steps`` stops this call after that many steps (with a checkpoint), and so does
    SIGTERM after the current step: both return ``{"stopped_at_step", "total_steps",
    "preempted"}`` and the next call resumes. ``devices`` restricts the mesh (default: all
    devices).
    """
    workdir = ensure_writable(workdir)
    is_main = jax.process_index() == 0
    experiment = create_experiment(config, devices=devices)
    config_json = config_lib.to_json(config)
    checkpoints = checkpoint.Checkpoints(workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    try:
        with _Preemption() as preemption:
            return _run(
                experiment,
                workdir,
                checkpoints,
                writer,
                config_json,
                max_steps,
                is_main,
                preemption,
            )
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.close()


def _run(
    experiment, workdir, checkpoints, writer, config_json, max_steps, is_main, preemption
) -> dict:
    config = experiment.config
    replicated = sharding.replicated(experiment.mesh)
    state = experiment.state
    results_path = workdir / RESULTS_FILE

    if checkpoints.latest_step() is not None:
        state, saved = checkpoints.resume(checkpoint.abstract_like(state, replicated))
        diffs = _config_differences(saved, json.loads(config_json))
        if diffs:
            logging.warning("Resuming with a config that differs from the saved one: %s", diffs)
        logging.info("Resumed from the checkpoint at step %d", int(state["step"]))
    start_step = int(state["step"])
    total = experiment.total_steps
    if total == 0:
        return _evaluate_untrained(experiment, state, workdir, writer, is_main)
    if start_step >= total and results_path.exists():
        logging.info("Training already complete; results in %s", results_path)
        return json.loads(results_path.read_text())
    end_step = total if max_steps is None else min(total, start_step + max_steps)

    best = checkpoints.best_metrics()
    best_accuracy = best[1]["accuracy"] if best else -1.0
    logging.info(
        "Training %s on %s with %s: steps %d..%d of %d (%d per epoch), %d devices",
        config.method.name,
        config.dataset.name,
        config.backbone.name,
        start_step,
        end_step,
        total,
        experiment.steps_per_epoch,
        experiment.mesh.devices.size,
    )
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
    batches = experiment.train_batches(start_step) if start_step < end_step else iter(())
    train_metrics = None
    step, preempted = start_step, False
    for step in range(start_step + 1, end_step + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = sharding.to_global_batch(next(batches), experiment.mesh)
            state, update = experiment.train_step(
                state, experiment.frozen, batch, experiment.train_rng
            )
        train_metrics = update if train_metrics is None else train_metrics.merge(update)
        report(step)
        epoch_end = step % experiment.steps_per_epoch == 0
        if step % config.log_every_steps == 0 or epoch_end or step == end_step:
            _write_train_metrics(experiment, train_metrics, step, writer, checkpoints)
            train_metrics = None
        if epoch_end:
            val = experiment.evaluate(state["trained"], config.dataset.val_split)
            writer.write_scalars(step, {f"val_{k}": v for k, v in val.items()})
            if is_main and hasattr(experiment.method, "visualize"):
                _write_pictures(experiment, state["trained"], step, writer, workdir)
            if config.report_test_selected:
                _record_test_accuracy(experiment, state["trained"], step, writer, workdir, is_main)
            if val["accuracy"] > best_accuracy:
                best_accuracy = val["accuracy"]
                checkpoints.save_best(step, state["trained"], config_json, val)
            checkpoints.save_latest(step, state, config_json)
        # Asked last, so that a signal arriving at any point of this step stops right here.
        preempted = preemption.requested()
        if preempted:
            break
    if train_metrics is not None:  # a logging window cut short by SIGTERM: checked, then saved
        _write_train_metrics(experiment, train_metrics, step, writer, checkpoints)
    writer.flush()
    if preempted or step < total:
        if checkpoints.latest_step() != step:
            checkpoints.save_latest(step, state, config_json)
        logging.info(
            "Stopped after step %d of %d (%s); rerun with the same workdir to resume",
            step,
            total,
            "SIGTERM" if preempted else "max_steps",
        )
        return {"stopped_at_step": step, "total_steps": total, "preempted": preempted}

    checkpoints.wait()
    if config.selection == "last":  # the validation split was trained on (VPT's trainval)
        val = experiment.evaluate(state["trained"], config.dataset.val_split)
        return _finish(experiment, state, state["trained"], step, val, workdir, writer, is_main)
    best_step, best_val = checkpoints.best_metrics()
    best_trained = checkpoints.restore_best(checkpoint.abstract_like(state["trained"], replicated))
    return _finish(experiment, state, best_trained, best_step, best_val, workdir, writer, is_main)


def _write_train_metrics(experiment, train_metrics, step, writer, checkpoints) -> None:
    """Log the training metrics merged since the last log, failing if the loss is not finite."""
    values = {k: float(v) for k, v in train_metrics.compute().items()}
    _check_finite(values, checkpoints)
    lrs = {f"lr_{g}": float(s(step)) for g, s in experiment.schedules.items()}
    writer.write_scalars(step, {f"train_{k}": v for k, v in values.items()} | lrs)


def _evaluate_untrained(experiment, state, workdir, writer, is_main) -> dict:
    """``num_epochs=0`` (zero-shot evaluation): the initial state is the result."""
    logging.info("num_epochs=0: evaluating %s without training", experiment.config.method.name)
    val = experiment.evaluate(state["trained"], experiment.config.dataset.val_split)
    return _finish(experiment, state, state["trained"], 0, val, workdir, writer, is_main)


def _finish(experiment, state, best_trained, best_step, best_val, workdir, writer, is_main):
    """Evaluate the selected state on the test split and write ``results.json``."""
    config = experiment.config
    test = experiment.evaluate(best_trained, config.dataset.test_split)
    last_is_selected = best_step == experiment.total_steps
    results = {
        "method": config.method.name,
        "backbone": config.backbone.name,
        "dataset": config.dataset.name,
        "preset": config.dataset.preset,
        "total_steps": experiment.total_steps,
        "best_step": best_step,
        "val": best_val,
        "test": test,
        # The final state, as papers that report the last epoch do.
        "test_last": test
        if last_is_selected
        else experiment.evaluate(state["trained"], config.dataset.test_split),
        "trainable_params": _count(state["trained"]["params"]),
        "frozen_params": _count(experiment.frozen),
        "protocol": protocol_report(experiment),
    }
    results |= _mixture_results(experiment, best_trained)
    writer.write_scalars(experiment.total_steps, {f"test_{k}": v for k, v in test.items()})
    if is_main:
        if (workdir / TEST_EACH_EPOCH_FILE).exists():
            results["test_selected"] = _test_selected(workdir)
        _write_json(workdir / RESULTS_FILE, results)
    logging.info("Test accuracy %.4f (best validation step %d)", test["accuracy"], best_step)
    return results


def protocol_report(experiment) -> dict:
    """The run's protocol card and, when its config names a protocol, where it departs from it
    (``jprompt.train.protocols``)."""
    config = experiment.config
    card = protocols.card(
        config.to_dict(),
        activation=backbones.activation(config.backbone),
        normalization=experiment.spec.normalization,
        checkpoint_sha256=protocols.file_sha256(config.backbone.checkpoint),
    )
    card["steps_per_epoch"] = experiment.steps_per_epoch
    report = {"name": config.protocol, "card": card}
    if config.protocol:
        report["differences"] = protocols.differences(card, config.protocol)
        for difference in report["differences"]:
            logging.warning("Departs from the %s protocol: %s", config.protocol, difference)
    return report


def _write_json(path: epath.Path, value) -> None:
    """Written beside, then renamed: a job killed while writing leaves no truncated file (which
    the next run could take for "training complete")."""
    partial = path.parent / f"{path.name}.partial"
    partial.write_text(json.dumps(value, indent=2))
    partial.replace(path)


def _record_test_accuracy(experiment, trained, step, writer, workdir, is_main) -> None:
    """``config.report_test_selected``: the test accuracy after this epoch, kept only to report
    the optimistic number that selecting on the test split gives; never used for selection."""
    test = experiment.evaluate(trained, experiment.config.dataset.test_split)
    writer.write_scalars(step, {"test_each_epoch_accuracy": test["accuracy"]})
    if is_main:
        path = workdir / TEST_EACH_EPOCH_FILE
        record = json.loads(path.read_text()) if path.exists() else {}
        record[str(step)] = test["accuracy"]  # a resumed run redoes an epoch identically
        _write_json(path, record)


def _test_selected(workdir) -> dict:
    record = json.loads((workdir / TEST_EACH_EPOCH_FILE).read_text())
    step, accuracy = max(record.items(), key=lambda item: (item[1], -int(item[0])))
    return {
        "accuracy": accuracy,
        "step": int(step),
        "note": "selected on the test split (optimistic; as the official VP and PGN code do)",
    }


def _write_pictures(experiment, trained, step, writer, workdir) -> None:
    """Prompted validation images (and masks) to TensorBoard and ``workdir/images``."""
    first_batch = next(iter(experiment.eval_batches(experiment.config.dataset.val_split)))
    pictures = visualize.method_pictures(
        experiment.method,
        trained,
        experiment.frozen,
        first_batch["image"][: visualize.NUM_IMAGES],
        rng=experiment.eval_rng,
        normalization=experiment.spec.normalization,
    )
    pictures |= _token_usage_picture(experiment, trained)
    writer.write_images(step, {name: picture[None] for name, picture in pictures.items()})
    for name, picture in pictures.items():
        visualize.write_png(workdir / "images" / f"{name}_{step}.png", picture)


def _token_usage_picture(experiment, trained) -> dict:
    """A mixture's use of the token library by source, on the first ``NUM_IMAGES`` validation
    images of each component (``visualize.token_usage_picture``); {} for a single dataset or a
    method without a token library."""
    data = experiment.config.dataset
    if not (mixture.is_mixture(data.name) and hasattr(experiment.method, "token_weights")):
        return {}
    images = []
    for source in range(len(mixture.parse(data.name))):
        batch = next(
            mixture.eval_iterator(
                data.name,
                data.val_split,
                global_batch_size=experiment.config.eval_batch_size,
                spec=experiment.spec,
                data_dir=data.data_dir or None,
                skip_undecodable=experiment.config.input.skip_undecodable,
                component=source,
            )
        )
        images.append(batch["image"][batch["mask"] > 0][: visualize.NUM_IMAGES])
    return visualize.token_usage_picture(experiment.method, trained, images)


def _mixture_results(experiment, trained) -> dict:
    """A mixture run's ``per_dataset`` scores on the test and validation splits (``val_``
    keys), and its ``division_of_labour`` on each (``mixture.division_of_labour``, for methods
    with a token library); {} for a single dataset."""
    data = experiment.config.dataset
    if not mixture.is_mixture(data.name):
        return {}
    per_dataset, results = {}, {}
    for prefix, split in (("", data.test_split), ("val_", data.val_split)):
        scores, usages = experiment.score_components(trained, split)
        for name, score in scores.items():
            per_dataset.setdefault(name, {}).update({prefix + k: v for k, v in score.items()})
        if all(usage is not None for usage in usages):
            results[f"{prefix}division_of_labour"] = mixture.division_of_labour(usages)
    for name, score in per_dataset.items():
        logging.info(
            "%s: test accuracy %.4f over all classes of the mixture, %.4f over its own",
            name,
            score["accuracy"],
            score["accuracy_own_classes"],
        )
    return {"per_dataset": per_dataset, **results}


def restore_best(config: ConfigDict, workdir) -> tuple[Experiment, dict]:
    """The experiment of ``config`` and the best trained state saved in ``workdir``."""
    experiment = create_experiment(config)
    checkpoints = checkpoint.Checkpoints(workdir)
    try:
        if checkpoints.best_metrics() is None:
            raise FileNotFoundError(
                f"{workdir} holds no trained state; train it first with python -m jprompt.main"
            )
        replicated = sharding.replicated(experiment.mesh)
        abstract = checkpoint.abstract_like(experiment.state["trained"], replicated)
        trained = checkpoints.restore_best(abstract)
    finally:
        checkpoints.close()
    return experiment, trained


def _count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))

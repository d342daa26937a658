"""The training loop: ``train_and_evaluate(config, workdir)``.

Data-parallel over every device: batches are global arrays split over all devices of the mesh,
the trainable state is replicated, the frozen backbone is replicated or, with
``config.model_axis_size > 1``, sharded over the mesh's ``model`` axis, and one jitted step updates
only the method's trainable tree. Progress, metrics (TensorBoard + log lines) and orbax
checkpoints go to ``workdir``; running again with the same ``workdir`` resumes from the newest
checkpoint, and because data order, randomness and the schedule are functions of the step, a
resumed run ends exactly where an uninterrupted one would, however the previous one ended:
``max_steps``, SIGTERM or Ctrl-C (a checkpoint is written first) or SIGKILL (the work since the
last checkpoint is redone). A workdir holds one experiment: a rerun with another config stops
before any work (``jprompt.train.workdir``).

A linear probe with ``cache_features`` computes each image's backbone features once and trains
its head on them (``jprompt.train.feature_cache``); the loop, checkpoints and selection are the
same.

In a multi-process job (``jprompt.train.distributed``) every process runs this same loop on its own
share of the data; only process 0 writes logs, pictures and results.
"""

import dataclasses
import functools
import itertools
import json
import os
import signal
import threading
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from jprompt import methods
from jprompt.data import mixture, mixture_name, pipeline, presets
from jprompt.data.preprocess import PreprocessSpec
from jprompt.errors import InputError, MissingFileError
from jprompt.methods import heads, label_mapping
from jprompt.methods.base import Method
from jprompt.models import backbones
from jprompt.train import (
    checkpoint,
    compilation,
    config_lib,
    distributed,
    events,
    feature_cache,
    optim,
    progress,
    protocols,
    remapping,
    sharding,
    visualize,
)
from jprompt.train.evaluate import evaluate, make_eval_step
from jprompt.train.metrics import NO_STEP
from jprompt.train.step import make_train_step
from jprompt.train.workdir import check_config, ensure_writable, save_config, write_json

RESULTS_FILE = "results.json"
# Added to the results a rerun of a finished workdir returns: they are its stored ones.
STORED = "stored"
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
    # The backbone file's sha256 for the protocol card, taken when it was loaded.
    checkpoint_sha256: str = ""

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
        if mixture_name.is_mixture(data.name):
            read = functools.partial(read, sampling=data.sampling)
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

    def evaluate(
        self, trained, split: str, batches: Iterable[dict] | None = None
    ) -> dict[str, float]:
        """Metrics of ``trained`` on ``split``; ``batches``: that split's, already opened."""
        return evaluate(
            self.eval_step,
            trained,
            self.frozen,
            self.eval_batches(split) if batches is None else batches,
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
    return mixture if mixture_name.is_mixture(name) else pipeline


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
    mapped = config.head.name in label_mapping.MAPPINGS
    backbone, backbone_params = backbones.build(
        config.backbone,
        image_size=config.input.image_size,
        rng=backbone_rng,
        source_head=mapped,
        text=config.head.name == "zeroshot",
    )
    if config.input.normalization:
        # A protocol that feeds a checkpoint other pixels than it was trained on (VPT: ImageNet
        # mean/std into vit_jax weights): the method, pictures and prompt inversion follow it.
        backbone = dataclasses.replace(backbone, normalization=config.input.normalization)
    method_options = {k: v for k, v in config.method.items() if k != "name"}
    zeroshot = build_zeroshot_head(config, backbone, train_info.class_names)
    mapping = (
        build_label_mapping(config, backbone, train_info.class_names, init_rng) if mapped else None
    )
    try:
        method = methods.build(
            config.method.name,
            backbone=backbone,
            num_classes=train_info.num_classes,
            zeroshot=zeroshot,
            label_mapping=mapping,
            **method_options,
        )
    except ValueError as error:  # an option the method refuses, named by its own check
        raise InputError(f"config.method: {error}") from None
    cache = method.caches_features
    trained, frozen = method.init(init_rng, backbone_params)
    tx, schedules = optim.build(
        config.optim, trained["params"], total_steps=total_steps, steps_per_epoch=steps_per_epoch
    )

    def initial_state(trained):
        return {
            "step": jnp.zeros((), jnp.int32),
            "trained": trained,
            "opt_state": tx.init(trained["params"]),
        }

    state = initial_state(trained)
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
        checkpoint_sha256=protocols.file_sha256(config.backbone.checkpoint),
    )
    if method.init_images is not None:  # a data-dependent init (VPT's SPT prototypes)
        images = _first_training_images(experiment, method.init_images or train_info.num_examples)
        trained = method.init_from_images(
            trained, experiment.frozen, images, jax.random.fold_in(init_rng, 1)
        )
        experiment.state = jax.device_put(initial_state(trained), replicated)
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


def build_label_mapping(config: ConfigDict, backbone, class_names, rng: jax.Array):
    """The label mapping ``config.head.name`` onto ``backbone.source_head`` for the dataset's
    ``class_names``; the counted ones start from ``first_c`` until the training loop counts them
    (``remapping``)."""
    num_source = backbone.source_head["kernel"].shape[-1]
    embeddings = {}
    if config.head.name == "semantic":
        embeddings = semantic_embeddings(config, num_source, class_names)
    return label_mapping.build(
        config.head.name,
        num_source=num_source,
        num_classes=len(class_names),
        per_class=config.head.sources_per_class,
        interval=config.head.remap_every_epochs,
        rng=jax.random.fold_in(rng, 2),
        **embeddings,
    )


def semantic_embeddings(config: ConfigDict, num_source: int, class_names) -> dict:
    """AutoVP's semantic mapping's inputs: the text features of the source head's class names
    (``head.source_class_names``, a file) and of the dataset's (cleaned as VP cleans them), bare
    names without a template, from ``head.text_backbone``'s text tower (AutoVP: CLIP ViT-B/32)."""
    path = config.head.source_class_names
    if not path:
        raise InputError(
            f"head=semantic needs the names of the source head's {num_source} classes: set "
            "head.source_class_names to a text file with one per line, in the head's order "
            "(for an ImageNet-1k head, the names AutoVP's IMGNET_CLASSNAME lists)"
        )
    path = epath.Path(os.path.expanduser(path))
    if not path.exists():
        raise MissingFileError(f"head.source_class_names: {path} does not exist")
    source_names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(source_names) != num_source:
        raise InputError(
            f"head.source_class_names: {path} names {len(source_names)} classes but the source "
            f"head has {num_source}; give one name per line for each of its outputs"
        )
    text_config = backbones.default_config(
        config.head.text_backbone, checkpoint=config.head.text_checkpoint
    )
    text_backbone, _ = backbones.build(
        text_config,
        image_size=backbones.native_image_size(text_config.name),
        rng=jax.random.key(0),
        text=True,
    )
    if text_backbone.text is None:
        raise InputError(
            f"head.text_backbone={text_config.name} has no text tower: use a clip_* backbone "
            "(AutoVP's is clip_b32)"
        )
    target_names = head_class_names(config, class_names)
    bare = ("{}",)
    return dict(
        source_embeddings=heads.class_embeddings(text_backbone.text, source_names, bare),
        target_embeddings=heads.class_embeddings(
            text_backbone.text, [heads.clean_class_name(n, "vp") for n in target_names], bare
        ),
    )


def _first_training_images(experiment: Experiment, count: int) -> np.ndarray:
    """The first ``count`` images the training iterator yields, as numpy, the same on every
    process (each reads its own share; they are gathered), padding left out."""
    batches = experiment.train_batches()
    found, have = [], 0
    while have < count:
        batch = next(batches)
        mask = batch.get("mask", np.ones(len(batch["image"]), np.float32))
        images, mask = multihost_utils.process_allgather((batch["image"], mask), tiled=True)
        found.append(np.asarray(images)[np.asarray(mask) > 0])
        have += len(found[-1])
    return np.concatenate(found)[:count]


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
        cache_decoded=inputs.cache_decoded,
    )


HEADS = ("linear", "zeroshot", *label_mapping.MAPPINGS)
SELECTIONS = ("val", "last")


def head_class_names(config: ConfigDict, class_names) -> Sequence[str]:
    """The names a text head reads for the dataset's ``class_names``: ``head.class_names``, or
    the preset's cleaning of the dataset's own."""
    preset = presets.get(config.dataset.preset)
    return config.head.class_names or preset.clean_class_names(class_names)


def build_zeroshot_head(config: ConfigDict, backbone, class_names):
    """The frozen zero-shot head when ``config.head.name == "zeroshot"``, else None."""
    if config.head.name not in HEADS:
        raise ValueError(f"unknown head {config.head.name!r}; valid choices: {HEADS}")
    if config.head.name != "zeroshot":
        return None
    return heads.build_zeroshot_head(
        backbone.text,
        head_class_names(config, class_names),
        config.head.templates or presets.get(config.dataset.preset).templates,
        backbone_name=backbone.name,
        name_rule=config.head.name_rule,
    )


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


class _StopSignals:
    """SIGTERM, which TPU/GPU schedulers send before taking machines back, and SIGINT (Ctrl-C) as
    requests to stop after the current step with a checkpoint, rather than to die losing the
    work since the last one. After a SIGINT the run then raises KeyboardInterrupt, as Ctrl-C
    would have; a second Ctrl-C interrupts at once.

    The handlers are installed on entry and the previous ones restored on exit. Python runs
    signal handlers only in the main thread, so elsewhere (a notebook's worker thread) nothing is
    installed and both signals keep their previous meaning.
    """

    def __init__(self):
        self.interrupted = False  # a SIGINT was received
        self._received = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                number: signal.signal(number, self._handle)
                for number in (signal.SIGTERM, signal.SIGINT)
            }
        return self

    def __exit__(self, *exc_info):
        for number, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the
            # closest Python can restore.
            signal.signal(number, signal.SIG_DFL if previous is None else previous)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
        self._received = True  # only a flag: the loop acts on it between steps

    def requested(self) -> bool:
        """Whether any process received a signal; a collective, so all stop at the same step."""
        return distributed.any_process(self._received)

    @property
    def name(self) -> str:
        if self.interrupted:
            return "Ctrl-C"
        return "SIGTERM" if self._received else "a signal to another process"


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
    ``max_steps`` stops this call after that many steps (with a checkpoint), and so do SIGTERM
    and Ctrl-C (SIGINT) after the current step: these return ``{"stopped_at_step",
    "total_steps", "preempted"}`` (Ctrl-C raises KeyboardInterrupt instead) and the next call
    resumes. ``devices`` restricts the mesh (default: all devices).

    ``workdir`` keeps the config of its run (``jprompt.train.workdir``): rerunning it with another
    config fails before any work, naming the differences. Rerunning a finished one returns its
    stored results, with ``STORED`` set: nothing is trained or evaluated again.
    """
    config_lib.validate(config)
    workdir = ensure_writable(workdir)
    config_json = config_lib.to_json(config)
    results_path = workdir / RESULTS_FILE
    finished = results_path.exists()  # written last, once a run is complete
    changes = check_config(
        workdir,
        config_json,
        finished=finished,
        resume_with_changes=config.resume_with_changes,
    )
    if finished:
        logging.info(
            "%s holds the finished run of this config: these are its stored results (%s), "
            "nothing was trained or evaluated now",
            workdir,
            results_path,
        )
        return json.loads(results_path.read_text()) | {STORED: True}
    is_main = jax.process_index() == 0
    with progress.quiet_library_info():
        experiment = create_experiment(config, devices=devices)
        checkpoints = checkpoint.Checkpoints(workdir)
        if is_main:
            kept = save_config(
                workdir,
                config_json,
                replaced_at_step=(checkpoints.latest_step() or 0) if changes else None,
            )
            if changes:
                logging.warning(
                    "Continuing %s with a changed config on purpose (resume_with_changes; the "
                    "replaced one is kept as %s): %s",
                    workdir,
                    kept,
                    "; ".join(changes),
                )
        writer = events.Writer(workdir, enabled=is_main)
        run = _Run(experiment, workdir, checkpoints, writer, config_json, is_main)
        try:
            with _StopSignals() as stop:
                return _train(run, max_steps, stop)
        finally:
            checkpoints.wait()
            checkpoints.close()
            writer.close()


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every phase of one ``train_and_evaluate`` call shares."""

    experiment: Experiment
    workdir: epath.Path
    checkpoints: checkpoint.Checkpoints
    writer: events.Writer
    config_json: str
    is_main: bool  # process 0: writes the files every process computed


def _train(run: _Run, max_steps: int | None, stop: _StopSignals) -> dict:
    experiment, checkpoints = run.experiment, run.checkpoints
    config = experiment.config
    replicated = sharding.replicated(experiment.mesh)
    state = experiment.state

    if checkpoints.latest_step() is not None:
        state = checkpoints.resume(checkpoint.abstract_like(state, replicated))
        logging.info("Resumed from the checkpoint at step %d", int(state["step"]))
    start_step = int(state["step"])
    total = experiment.total_steps
    if total == 0:
        return _evaluate_untrained(run, state)
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
    report = progress.Progress(
        start_step=start_step, total_steps=total, steps_per_epoch=experiment.steps_per_epoch
    )
    mappings = _resume_mapping(run, start_step)
    batches = experiment.train_batches(start_step) if start_step < end_step else iter(())
    train_metrics = None
    step, stopped = start_step, False
    for step in range(start_step + 1, end_step + 1):
        if mappings is not None and (step - 1) % experiment.steps_per_epoch == 0:
            _remap_for_epoch(run, mappings, state["trained"], step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = sharding.to_global_batch(next(batches), experiment.mesh)
            state, update = experiment.train_step(
                state, experiment.frozen, batch, experiment.train_rng
            )
        report.step_done(step)
        train_metrics = update if train_metrics is None else train_metrics.merge(update)
        epoch_end = step % experiment.steps_per_epoch == 0
        train = val = None
        if step % config.log_every_steps == 0 or epoch_end or step == end_step:
            train = _write_train_metrics(run, train_metrics, step, report)
            train_metrics = None
        if epoch_end:
            val = _validate(run, state["trained"], step)
        if train or val:
            report.log(step, train, val)
        if epoch_end:
            if val["accuracy"] > best_accuracy:
                best_accuracy = val["accuracy"]
                checkpoints.save_best(step, state["trained"], run.config_json, val)
            checkpoints.save_latest(step, state, run.config_json)
        # Asked last, so that a signal arriving at any point of this step stops right here.
        stopped = stop.requested()
        if stopped:
            break
    if train_metrics is not None:  # a logging window cut short by a signal: checked, then saved
        report.log(step, _write_train_metrics(run, train_metrics, step, report))
    run.writer.flush()
    if stopped or step < total:
        if checkpoints.latest_step() != step:
            checkpoints.save_latest(step, state, run.config_json)
        logging.info(
            "Stopped after step %d of %d (%s) with a checkpoint; rerun with the same workdir to "
            "resume",
            step,
            total,
            stop.name if stopped else "max_steps",
        )
        if stop.interrupted:
            raise KeyboardInterrupt(f"stopped after step {step} of {total}, checkpoint saved")
        return {"stopped_at_step": step, "total_steps": total, "preempted": stopped}

    checkpoints.wait()
    if config.selection == "last":  # the validation split was trained on (VPT's trainval)
        val = experiment.evaluate(state["trained"], config.dataset.val_split)
        return _finish(run, state, state["trained"], step, val)
    best_step, best_val = checkpoints.best_metrics()
    best_trained = checkpoints.restore_best(checkpoint.abstract_like(state["trained"], replicated))
    return _finish(run, state, best_trained, best_step, best_val)


def _resume_mapping(run: _Run, start_step: int) -> dict | None:
    """A counted label mapping's history (``remapping``), and ``experiment.frozen`` on the
    mapping in effect at ``start_step``; None for other heads."""
    experiment = run.experiment
    if not remapping.is_counted(experiment.method):
        return None
    mappings = remapping.read(run.workdir)
    if start_step > 0:
        index = remapping.in_effect(mappings, start_step // experiment.steps_per_epoch)
        if index is not None:
            remapping.use(experiment, index)
    return mappings


def _remap_for_epoch(run: _Run, mappings: dict, trained, step: int) -> None:
    """Before the first ``step`` of an epoch: the mapping that epoch trains with, counted with
    ``trained`` where the mapping remaps then, and recorded; one recorded before a resume is
    taken as it is."""
    experiment = run.experiment
    epoch = remapping.epoch_of(step, experiment.steps_per_epoch)
    if epoch in mappings:
        remapping.use(experiment, mappings[epoch])
    elif experiment.method.label_mapping.remaps_at(epoch):
        mappings[epoch] = remapping.count(experiment, trained, epoch)
        remapping.use(experiment, mappings[epoch])
        if run.is_main:
            remapping.record(run.workdir, mappings)


def _use_mapping_of_step(experiment: Experiment, workdir, step: int) -> None:
    """A counted mapping: ``experiment.frozen`` on the one training step ``step`` used."""
    if remapping.is_counted(experiment.method) and step > 0:
        epoch = remapping.epoch_of(step, experiment.steps_per_epoch)
        index = remapping.in_effect(remapping.read(workdir), epoch)
        if index is None:  # never silently the initial first_c
            head = experiment.config.head.name
            raise InputError(
                f"{workdir} holds no {remapping.MAPPING_FILE} with the head={head} mapping of "
                f"epoch {epoch}, so the run's mapping is unknown: train it again in a new workdir"
            )
        remapping.use(experiment, index)


def _validate(run: _Run, trained, step: int) -> dict[str, float]:
    """The end of an epoch: validation metrics, pictures and the per-epoch test record."""
    experiment = run.experiment
    config = experiment.config
    batches = iter(experiment.eval_batches(config.dataset.val_split))
    first_batch = next(batches)  # its images are drawn: read once, as the pass reads them
    val = experiment.evaluate(
        trained, config.dataset.val_split, itertools.chain([first_batch], batches)
    )
    run.writer.write_scalars(step, {f"val_{k}": v for k, v in val.items()})
    if run.is_main and experiment.method.has_pictures:
        _write_pictures(run, trained, step, first_batch["image"])
    if config.report_test_selected:
        _record_test_accuracy(run, trained, step)
    return val


def _write_train_metrics(run: _Run, train_metrics, step: int, report) -> dict:
    """Write the training metrics merged since the last write, failing if the loss is not
    finite; return them."""
    values = {k: float(v) for k, v in train_metrics.compute().items()}
    _check_finite(values, run.checkpoints)
    lrs = {f"lr_{g}": float(s(step)) for g, s in run.experiment.schedules.items()}
    rate = report.steps_per_sec(step)
    speed = {} if rate is None else {"steps_per_sec": rate}
    run.writer.write_scalars(step, {f"train_{k}": v for k, v in values.items()} | lrs | speed)
    return values


def _evaluate_untrained(run: _Run, state) -> dict:
    """``num_epochs=0`` (zero-shot evaluation): the initial state is the result."""
    experiment = run.experiment
    logging.info("num_epochs=0: evaluating %s without training", experiment.config.method.name)
    mappings = _resume_mapping(run, 0)
    if mappings is not None:  # e.g. the frequency mapping of the unprompted model
        _remap_for_epoch(run, mappings, state["trained"], 1)
    val = experiment.evaluate(state["trained"], experiment.config.dataset.val_split)
    return _finish(run, state, state["trained"], 0, val)


def _finish(run: _Run, state, best_trained, best_step: int, best_val: dict) -> dict:
    """Evaluate the selected state (``best_trained``, from ``best_step``) on the test split and
    write ``results.json``."""
    experiment, workdir = run.experiment, run.workdir
    config = experiment.config
    _use_mapping_of_step(experiment, workdir, best_step)
    test = experiment.evaluate(best_trained, config.dataset.test_split)
    mixture_results = _mixture_results(experiment, best_trained)
    last_is_selected = best_step == experiment.total_steps
    _use_mapping_of_step(experiment, workdir, experiment.total_steps)
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
    results |= mixture_results
    run.writer.write_scalars(experiment.total_steps, {f"test_{k}": v for k, v in test.items()})
    if run.is_main:
        if (workdir / TEST_EACH_EPOCH_FILE).exists():
            results["test_selected"] = _test_selected(workdir)
        write_json(workdir / RESULTS_FILE, results)
        logging.info(
            "Test accuracy %.4f (best validation step %d). Results in %s; TensorBoard: "
            "tensorboard --logdir %s%s",
            test["accuracy"],
            best_step,
            workdir / RESULTS_FILE,
            workdir,
            f"; pictures in {workdir / 'images'}" if (workdir / "images").exists() else "",
        )
    return results


def protocol_report(experiment) -> dict:
    """The run's protocol card and, when its config names a protocol, where it departs from it
    (``jprompt.train.protocols``)."""
    config = experiment.config
    card = protocols.card(
        config.to_dict(),
        activation=backbones.activation(config.backbone),
        normalization=experiment.spec.normalization,
        checkpoint_sha256=experiment.checkpoint_sha256,
    )
    card["steps_per_epoch"] = experiment.steps_per_epoch
    report = {"name": config.protocol, "card": card}
    if config.protocol:
        report["differences"] = protocols.differences(card, config.protocol)
        for difference in report["differences"]:
            logging.warning("Departs from the %s protocol: %s", config.protocol, difference)
    return report


def _record_test_accuracy(run: _Run, trained, step: int) -> None:
    """``config.report_test_selected``: the test accuracy after this epoch, kept only to report
    the optimistic number that selecting on the test split gives; never used for selection."""
    test = run.experiment.evaluate(trained, run.experiment.config.dataset.test_split)
    run.writer.write_scalars(step, {"test_each_epoch_accuracy": test["accuracy"]})
    if run.is_main:
        path = run.workdir / TEST_EACH_EPOCH_FILE
        record = json.loads(path.read_text()) if path.exists() else {}
        record[str(step)] = test["accuracy"]  # a resumed run redoes an epoch identically
        write_json(path, record)


def _test_selected(workdir) -> dict:
    record = json.loads((workdir / TEST_EACH_EPOCH_FILE).read_text())
    step, accuracy = max(record.items(), key=lambda item: (item[1], -int(item[0])))
    return {
        "accuracy": accuracy,
        "step": int(step),
        "note": "selected on the test split (optimistic; as the official VP and PGN code do)",
    }


def _write_pictures(run: _Run, trained, step: int, images) -> None:
    """Prompted validation ``images`` (and masks) to TensorBoard and ``workdir/images``."""
    experiment = run.experiment
    pictures = visualize.method_pictures(
        experiment.method,
        trained,
        experiment.frozen,
        images[: visualize.NUM_IMAGES],
        rng=experiment.eval_rng,
        normalization=experiment.spec.normalization,
    )
    pictures |= _token_usage_picture(experiment, trained)
    run.writer.write_images(step, {name: picture[None] for name, picture in pictures.items()})
    for name, picture in pictures.items():
        visualize.write_png(run.workdir / "images" / f"{name}_{step}.png", picture)


def _token_usage_picture(experiment, trained) -> dict:
    """A mixture's use of the token library by source, on the first ``NUM_IMAGES`` validation
    images of each component (``visualize.token_usage_picture``); {} for a single dataset or a
    method without a token library."""
    data = experiment.config.dataset
    if not (mixture_name.is_mixture(data.name) and experiment.method.has_token_weights):
        return {}
    images = []
    for source in range(len(mixture_name.parse(data.name))):
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
    if not mixture_name.is_mixture(data.name):
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
        _use_mapping_of_step(experiment, workdir, checkpoints.best_metrics()[0])
    finally:
        checkpoints.close()
    return experiment, trained


def _count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))

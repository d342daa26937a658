"""Optimizers for the trainable tree: optax SGD/AdamW, warmup + cosine, per-group learning rates.

Only the method's trainable parameters ever reach the optimizer; the frozen backbone has no
optimizer state at all. Learning rates can differ by parameter group: ``lr_by_path`` is a tuple of
``(regex, lr)`` pairs matched against "/"-joined parameter paths (first match wins, the rest use
``lr``), e.g. AdaViPro's ``(("prompter/mask_generator/.*", 1.0),)`` with ``lr=40``. ``validate``
rejects a config no run can use (an unknown choice, a learning rate that is nan or negative).
"""

import math
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from jprompt.errors import InputError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
SCHEDULE_UNITS = ("step", "epoch")
# How the linear warmup starts, with u one schedule unit (a step, or an epoch's steps) and t the
# step rounded down to its unit: lr = base * w(t) / warmup_steps, where w(t) is
#   "from_zero": t (the first unit trains at lr 0),
#   "vp": t + u (VP's utils.cosine_lr: the first step at base / warmup, base reached at the end),
#   "pgn": max(t, u) (PGN's CosineWithWarmup: the first epoch at base / warmup, as the second).
WARMUP_RULES = ("from_zero", "vp", "pgn")


def path_str(path) -> str:
    """Slash-joined names of a ``jax.tree_util`` key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def warmup_cosine(
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    end_lr_factor: float = 0.0,
    kind: str = "cosine",
    steps_per_epoch: int | None = None,
    warmup_rule: str = "from_zero",
) -> optax.Schedule:
    """Linear warmup (``WARMUP_RULES``), then cosine decay to ``base_lr * end_lr_factor`` (or
    constant).

    With ``steps_per_epoch`` the schedule is stepped per epoch, as in the official VPT and PGN
    code: the step count is rounded down to the start of its epoch before evaluating it.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid choices: {SCHEDULES}")
    if warmup_rule not in WARMUP_RULES:
        raise ValueError(f"unknown warmup_rule {warmup_rule!r}; valid choices: {WARMUP_RULES}")
    warmup_steps = min(warmup_steps, total_steps)
    unit = steps_per_epoch or 1

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if steps_per_epoch:
            step = jnp.floor(step / steps_per_epoch) * steps_per_epoch
        warmed = {"from_zero": step, "vp": step + unit, "pgn": jnp.maximum(step, unit)}
        warm = base_lr * warmed[warmup_rule] / max(warmup_steps, 1)
        if kind == "constant":
            decayed = jnp.asarray(base_lr, jnp.float32)
        else:
            progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
            cosine = 0.5 * (1 + jnp.cos(jnp.pi * progress))
            decayed = base_lr * (end_lr_factor + (1 - end_lr_factor) * cosine)
        return jnp.where(step < warmup_steps, warm, decayed)

    return schedule


def group_labels(params, lr_by_path, default_lr: float) -> tuple[dict, dict[str, float]]:
    """Label each parameter with its group and return ``(labels, {label: lr})``."""
    patterns = [(re.compile(pattern), float(lr)) for pattern, lr in lr_by_path]
    lrs = {"default": default_lr}

    def label(path, _):
        name = path_str(path)
        for pattern, lr in patterns:
            if pattern.fullmatch(name):
                lrs[pattern.pattern] = lr  # the regex names the group in logs
                return pattern.pattern
        return "default"

    labels = jax.tree_util.tree_map_with_path(label, params)
    return labels, lrs


def _decay_mask(params):
    """Weight decay applies to kernels and prompts, not to biases or norm parameters."""

    def decays(path, leaf):
        last = path_str(path).rsplit("/", 1)[-1]
        return leaf.ndim > 1 and last not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(decays, params)


def _base_optimizer(config: ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    if config.name == "adamw":
        return optax.adamw(
            lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=_decay_mask
        )
    # sgd: coupled L2 (added to the gradient before momentum), as in the VPT/VP PyTorch code.
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
        optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov),
    )


def validate(config: ConfigDict) -> None:
    """An InputError naming the field and the fix where ``config`` (``config.optim``) cannot
    train: an unknown choice, a learning rate that is not a finite number >= 0, a bad regex."""
    choices = {
        "name": OPTIMIZERS,
        "schedule": SCHEDULES,
        "schedule_unit": SCHEDULE_UNITS,
        "warmup_rule": WARMUP_RULES,
    }
    for field, valid in choices.items():
        if config[field] not in valid:
            raise InputError(f"unknown optim.{field} {config[field]!r}; valid choices: {valid}")
    if not _is_lr(config.lr):
        raise InputError(
            f"optim.lr={config.lr!r} is not a learning rate; set --config.optim.lr to a finite "
            "number >= 0"
        )
    for entry in config.lr_by_path:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise InputError(
                f"optim.lr_by_path holds {entry!r}, not a (regex, lr) pair; write pairs in a "
                "tuple, e.g. (('head/.*', 0.1),)"
            )
        pattern, lr = entry
        try:
            re.compile(pattern)
        except re.error as error:
            raise InputError(f"optim.lr_by_path: {pattern!r} is no regex ({error})") from None
        if not _is_lr(lr):
            raise InputError(
                f"optim.lr_by_path gives {pattern!r} lr={lr!r}, not a learning rate; each must "
                "be a finite number >= 0"
            )
    for field in ("warmup_steps", "warmup_epochs"):
        if config[field] < 0:
            raise InputError(f"optim.{field}={config[field]} is negative; set it to 0 or more")


def _is_lr(lr) -> bool:
    return isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0


def build(
    config: ConfigDict, params, *, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Mapping[str, Callable]]:
    """The optimizer for ``params`` and the learning-rate schedule of each group (for logging).

    ``config`` fields: name, lr, lr_by_path, momentum, nesterov, b1, b2, weight_decay,
    grad_clip_norm, schedule, warmup_steps, warmup_epochs (added to warmup_steps),
    warmup_rule, end_lr_factor, schedule_unit.
    """
    validate(config)
    labels, lrs = group_labels(params, config.lr_by_path, config.lr)
    schedules = {
        label: warmup_cosine(
            base_lr=lr,
            total_steps=total_steps,
            warmup_steps=config.warmup_steps + round(config.warmup_epochs * steps_per_epoch),
            end_lr_factor=config.end_lr_factor,
            kind=config.schedule,
            steps_per_epoch=steps_per_epoch if config.schedule_unit == "epoch" else None,
            warmup_rule=config.warmup_rule,
        )
        for label, lr in lrs.items()
    }
    per_group = optax.multi_transform(
        {label: _base_optimizer(config, sched) for label, sched in schedules.items()}, labels
    )
    if config.grad_clip_norm:
        per_group = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), per_group)
    return per_group, schedules

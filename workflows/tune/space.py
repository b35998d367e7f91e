"""The search space, and the configs it makes: a trial's, the best one's, a tuned pipeline's.

:func:`apply_values` is the one place where tuned values enter a config: ``contrastive tune``
(trials and ``best.yaml``, through :func:`apply_params`) and the pipeline's tune node (through
``workflows.stages.tuned_config``) both go through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import tune

from pipeline.config import Config, ConfigError, parse_config
from workflows.tune.errors import TuneError
from workflows.tune.store import plain

__all__ = [
    "METRIC",
    "PARAMS",
    "apply_params",
    "apply_values",
    "check_config",
    "clean_params",
    "param_space",
    "trial_config",
    "trial_resources",
]

METRIC = "val_knn_top1"
"""What every trial reports each epoch and ASHA compares (val kNN top-1, percent)."""

PARAMS: dict[str, str] = {
    "temperature": "pretrain.temperature",
    "head_depth": "model.head_depth",
    "strength": "augment.strength",
    "lr": "pretrain.lr",
}
"""Search-space names -> the config fields they set."""


def _dim(lo: float, hi: float, log: bool = False) -> Any:
    """A uniform (or log-uniform) dimension, or the value itself when the range is one point."""
    if lo >= hi:
        return lo
    return tune.loguniform(lo, hi) if log else tune.uniform(lo, hi)


def param_space(cfg: Config) -> dict[str, Any]:
    """The Tune search space from ``cfg.tune``: log-uniform temperature (and lr, when a range is
    given), integer head depth (inclusive range), uniform augmentation strength."""
    tc = cfg.tune
    lo, hi = tc.head_depth
    space: dict[str, Any] = {
        "temperature": _dim(*tc.temperature, log=True),
        "head_depth": tune.randint(lo, hi + 1) if lo < hi else int(lo),
        "strength": _dim(*tc.strength),
    }
    if tc.lr is not None:
        space["lr"] = _dim(*tc.lr, log=True)
    return space


def clean_params(params: Mapping[str, Any]) -> dict[str, float]:
    """The sampled values as plain Python numbers (head depth an int), search-space names only."""
    out: dict[str, float] = {}
    for name in PARAMS:
        if name in params and params[name] is not None:
            v = params[name]
            v = v.item() if hasattr(v, "item") else v
            out[name] = int(v) if name == "head_depth" else float(v)
    return out


def apply_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the config dict ``base`` with tuned ``values`` (config field -> value, e.g.
    ``{"model.head_depth": 2}``) set.

    ``finetune.from_head_layer`` is lowered to the head depth when it would exceed it (the config
    requires ``from_head_layer <= head_depth``). The result is not validated.
    """
    raw: dict[str, Any] = plain(dict(base))
    for dotted, value in values.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    depth = raw.get("model", {}).get("head_depth")
    ft = raw.setdefault("finetune", {})
    if depth is not None and int(ft.get("from_head_layer", 1)) > int(depth):
        ft["from_head_layer"] = int(depth)
    return raw


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A full config dict: ``base`` with the sampled values (search-space names) set, through
    :func:`apply_values`, and ``tune.enabled`` false. Raises :class:`TuneError` if the result is
    not a valid config.
    """
    values = {PARAMS[name]: v for name, v in clean_params(params).items()}
    raw = apply_values(base, values)
    raw.setdefault("tune", {})["enabled"] = False
    try:
        parse_config(raw)
    except ConfigError as err:
        raise TuneError(f"tune: sampled values make a bad config: {err}") from None
    return raw


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> Config:
    """The config one trial pretrains with: :func:`apply_params`, ``pretrain.epochs`` set to
    ``tune.epochs`` and the online val kNN every epoch (what ASHA compares)."""
    raw = apply_params(base, params)
    raw["pretrain"]["epochs"] = int(raw.get("tune", {}).get("epochs", 3))
    raw["pretrain"]["knn_every"] = 1
    return parse_config(raw)


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial asks Ray for: ``resources.cpus_per_worker`` CPUs, and 1 GPU with
    ``resources.use_gpu`` (a trial is one worker process; ``resources.stages.pretrain`` applies)."""
    res = cfg.resources.for_stage("pretrain")
    return {
        "cpu": float(res.cpus_per_worker),
        "gpu": 1.0 if cfg.resources.use_gpu else 0.0,
    }


def check_config(cfg: Config) -> None:
    """A one-line :class:`TuneError` unless every trial of ``cfg.tune`` gets a valid config."""
    if cfg.tune.grace_period > cfg.tune.epochs:
        raise TuneError(
            f"tune: tune.grace_period {cfg.tune.grace_period} exceeds tune.epochs {cfg.tune.epochs}"
        )
    # The base config must survive the round trip (apply_params, inside trial_config, raises
    # TuneError if not), and a trial's (pretrain.epochs = tune.epochs) must be valid too.
    try:
        trial_config(cfg.to_dict(), {})
    except ConfigError as err:
        raise TuneError(f"tune: with tune.epochs {cfg.tune.epochs} a trial's {err}") from None

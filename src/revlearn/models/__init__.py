"""Pure models on pytrees (``init(key, ...)`` / ``apply(params, x)`` returning
log-probabilities), losses, parameter groups and deterministic minibatches."""

from revlearn.models._convnet import convnet_apply, convnet_init
from revlearn.models._dtype import resolve_dtype
from revlearn.models._groups import group_schedule, param_groups, per_group
from revlearn.models._losses import error_rate, l2_penalty, nll
from revlearn.models._minibatch import batch_indices, minibatch
from revlearn.models._mlp import logistic_apply, logistic_init, mlp_apply, mlp_init

__all__ = [
    "batch_indices",
    "convnet_apply",
    "convnet_init",
    "error_rate",
    "group_schedule",
    "l2_penalty",
    "logistic_apply",
    "logistic_init",
    "minibatch",
    "mlp_apply",
    "mlp_init",
    "nll",
    "param_groups",
    "per_group",
    "resolve_dtype",
]

"""Sparse optimizers applied row by row, with their state stored next to the row.

A table row is one float32 vector: the `dim` values, then the optimizer's state::

    sgd              [ w(dim) ]
    adagrad          [ w(dim) | sum g²(dim) ]
    rowwise_adagrad  [ w(dim) | mean g²(1) ]
    adam, adamw      [ w(dim) | m(dim) | v(dim) ]  (+ step(1) with per-row bias correction)
    ftrl             [ w(dim) | z(dim) | n(dim) ]

`update_row` is called by compiled kernels for each unique row of a batch, with the
row's summed gradient (it checks nothing: from Python, use `OptimizerKernel.update`);
the formulas follow torch.optim (SGD, Adagrad, SparseAdam, AdamW) and McMahan et al.
2013 (FTRL-proximal). A per-row step kept in float32 counts
exactly up to 2**24 updates of that row.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tidal.config import Adagrad, Adam, AdamW, Ftrl, OptimizerConfig, RowWiseAdagrad, Sgd
from tidal.errors import BatchError, ConfigError

__all__ = ["OptimizerKernel", "adagrad_row", "adam_row", "adamw_row", "ftrl_row", "rowwise_adagrad_row",
           "sgd_row", "update_row"]

SGD, ADAGRAD, ROWWISE_ADAGRAD, ADAM, ADAMW, FTRL = range(6)

# positions in the packed hyper-parameter vector
LR, EPS, BETA1, BETA2, WEIGHT_DECAY, L1, L2, PER_ROW_STEP, N_HYPER = range(9)


class OptimizerKernel:
    """What a compiled kernel needs to know of one optimizer config."""

    def __init__(self, config: OptimizerConfig, dim: int) -> None:
        if type(config) not in _CODES:
            raise ConfigError(f"an optimizer config must be one of {', '.join(c.__name__ for c in _CODES)} "
                              f"(tidal.Sgd(lr=0.01), ...), got {config!r}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigError(f"dim must be a whole number >= 1, got {dim!r}")
        self.code = _CODES[type(config)]
        self.dim = int(dim)
        self.state_width = config.state_width(dim)
        self.initial_state = getattr(config, "initial_accumulator_value", 0.0)
        self.hyper = _pack(config)
        # the state columns that are never negative (Adagrad's and FTRL's sums of squared
        # gradients, Adam's mean of them and its step): a root of a negative one is NaN
        self.nonnegative = slice(dim if self.code in (ADAM, ADAMW, FTRL) else 0, None if self.code != SGD else 0)
        # every optimizer but plain SGD needs the sum of a row's gradients before its update,
        # so a lookup must list its distinct rows; SGD adds each key's gradient as it comes
        self.sums_keys_first = self.code != SGD

    def update(self, row: np.ndarray, grad: np.ndarray, step: int = 1, lr_scale: float = 1.0) -> None:
        """Apply one step to `row` in place: a float32 array of the `dim` values and then
        the `state_width` values of state (the layout above), given its gradient `grad`
        (`dim` numbers). `step` is the table's update count (from 1), which Adam's bias
        correction uses; `lr_scale` as in `hyper_at`."""
        width = self.dim + self.state_width
        if not isinstance(row, np.ndarray) or row.dtype != np.float32 or row.shape != (width,):
            raise BatchError(f"row must be a float32 numpy array of {width} values ({self.dim} values and "
                             f"{self.state_width} of optimizer state), got {_described(row)}")
        if not row.flags.writeable:
            raise BatchError("row must be writeable: the update is applied in place")
        grad = np.asarray(grad) if isinstance(grad, (np.ndarray, list, tuple)) else grad
        if not isinstance(grad, np.ndarray) or grad.dtype.kind not in "iuf" or grad.shape != (self.dim,):
            raise BatchError(f"grad must be {self.dim} numbers (a 1-D array), got {_described(grad)}")
        with np.errstate(over="ignore"):  # past float32's range: infinite, and refused
            grad32 = grad.astype(np.float32)
        if not np.isfinite(grad32).all():  # a NaN would stay in the row for good
            raise BatchError(f"grad must be finite in float32 (magnitudes up to 3.4e38), got {grad.tolist()}")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 1 <= step < 2**63:
            raise BatchError(f"step must be a whole number from 1 to 2**63 - 1, got {step!r}")
        update_row(self.code, row, grad32, self.hyper_at(lr_scale), int(step))

    def negative_state_note(self, state: np.ndarray, keys: np.ndarray) -> str | None:
        """"a negative sum of squares or step in N rows (the first of key K)" for the rows
        of `state` ([n, state_width], one per key) that hold one; None when none does."""
        bad = np.flatnonzero((state[:, self.nonnegative] < 0).any(axis=1))
        if not bad.size:
            return None
        return (f"a negative sum of squares or step in {bad.size:,d} row{'s' if bad.size != 1 else ''} "
                f"(the first of key {int(keys[bad[0]])})")

    def hyper_at(self, lr_scale: float) -> np.ndarray:
        """The hyper-parameters with the learning rate (FTRL's alpha) times `lr_scale`;
        a `BatchError` for a factor that is not a finite number >= 0 (> 0 for FTRL, which
        divides by its alpha): a NaN would stay in every row it updated."""
        if lr_scale == 1.0:
            return self.hyper
        if not math.isfinite(lr_scale) or lr_scale < 0 or (lr_scale == 0 and self.code == FTRL):
            raise BatchError(f"the learning rate factor (lr_scale) must be a finite number >= 0"
                             f"{' and > 0 for FTRL, which divides by its alpha' if self.code == FTRL else ''}, "
                             f"got {lr_scale}")
        hyper = self.hyper.copy()
        hyper[LR] *= lr_scale
        return hyper


def _described(value: object) -> str:
    """An argument's type, with its dtype and shape when it is an array."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} of shape {list(value.shape)}"
    return type(value).__name__


_CODES = {Sgd: SGD, Adagrad: ADAGRAD, RowWiseAdagrad: ROWWISE_ADAGRAD, Adam: ADAM,
          AdamW: ADAMW, Ftrl: FTRL}


def _pack(config: OptimizerConfig) -> np.ndarray:
    hyper = np.zeros(N_HYPER, dtype=np.float64)
    if isinstance(config, Ftrl):
        hyper[LR], hyper[BETA1], hyper[L1], hyper[L2] = config.alpha, config.beta, config.l1, config.l2
        return hyper
    hyper[LR] = config.lr
    hyper[EPS] = getattr(config, "eps", 0.0)
    if isinstance(config, Adam):
        hyper[BETA1], hyper[BETA2] = config.beta1, config.beta2
        hyper[PER_ROW_STEP] = float(config.per_row_bias_correction)
        hyper[WEIGHT_DECAY] = getattr(config, "weight_decay", 0.0)
    return hyper


@numba.njit(nogil=True, inline="always")  # inlined, the kernels' loops vectorize
def update_row(code: int, row: np.ndarray, grad: np.ndarray, hyper: np.ndarray, step: int) -> None:
    """Apply one optimizer step to `row` ([width] float32) given its gradient ([dim]).

    For one row at a time; a kernel updating many rows should branch on `code` once,
    outside its loop, and call the `*_row` function: the loop then vectorizes.
    """
    if code == SGD:
        sgd_row(row, grad, hyper)
    elif code == ADAGRAD:
        adagrad_row(row, grad, hyper)
    elif code == ROWWISE_ADAGRAD:
        rowwise_adagrad_row(row, grad, hyper)
    elif code == ADAM:
        adam_row(row, grad, hyper, step)
    elif code == ADAMW:
        adamw_row(row, grad, hyper, step)
    else:
        ftrl_row(row, grad, hyper)


@numba.njit(nogil=True, inline="always")
def sgd_row(row, grad, hyper):  # type: ignore[no-untyped-def]
    lr = np.float32(hyper[LR])
    for d in range(grad.shape[0]):
        row[d] -= lr * grad[d]


@numba.njit(nogil=True, inline="always")
def adagrad_row(row, grad, hyper):  # type: ignore[no-untyped-def]
    dim = grad.shape[0]
    lr, eps = np.float32(hyper[LR]), np.float32(hyper[EPS])
    for d in range(dim):  # two simple loops vectorize where one fused loop does not
        row[dim + d] += grad[d] * grad[d]
    for d in range(dim):
        row[d] -= lr * grad[d] / (np.sqrt(row[dim + d]) + eps)


@numba.njit(nogil=True, inline="always")
def rowwise_adagrad_row(row, grad, hyper):  # type: ignore[no-untyped-def]
    dim = grad.shape[0]
    mean_square = 0.0
    for d in range(dim):
        mean_square += float(grad[d]) * grad[d]
    acc = row[dim] + mean_square / dim
    row[dim] = acc
    scale = hyper[LR] / (math.sqrt(acc) + hyper[EPS])
    for d in range(dim):
        row[d] -= scale * grad[d]


@numba.njit(nogil=True, inline="always")
def _adam_step(row, dim, hyper, step):  # type: ignore[no-untyped-def]
    """The bias-correction step: the row's own count, or the table's global step."""
    if hyper[PER_ROW_STEP] != 0.0:
        row[3 * dim] += 1.0
        return row[3 * dim]
    return step


@numba.njit(nogil=True, inline="always")
def adam_row(row, grad, hyper, step):  # type: ignore[no-untyped-def]
    """torch.optim.SparseAdam: p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)."""
    dim = grad.shape[0]
    b1, b2 = hyper[BETA1], hyper[BETA2]
    t = _adam_step(row, dim, hyper, step)
    step_size = hyper[LR] * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    for d in range(dim):
        g = grad[d]
        m = row[dim + d] + (g - row[dim + d]) * (1.0 - b1)
        v = row[2 * dim + d] + (g * g - row[2 * dim + d]) * (1.0 - b2)
        row[dim + d] = m
        row[2 * dim + d] = v
        row[d] -= step_size * m / (math.sqrt(v) + hyper[EPS])


@numba.njit(nogil=True, inline="always")
def adamw_row(row, grad, hyper, step):  # type: ignore[no-untyped-def]
    """torch.optim.AdamW: decay, then p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)."""
    dim = grad.shape[0]
    b1, b2 = hyper[BETA1], hyper[BETA2]
    t = _adam_step(row, dim, hyper, step)
    decay = 1.0 - hyper[LR] * hyper[WEIGHT_DECAY]
    step_size = hyper[LR] / (1.0 - b1**t)
    root_correction = math.sqrt(1.0 - b2**t)
    for d in range(dim):
        g = grad[d]
        m = b1 * row[dim + d] + (1.0 - b1) * g
        v = b2 * row[2 * dim + d] + (1.0 - b2) * g * g
        row[dim + d] = m
        row[2 * dim + d] = v
        row[d] = row[d] * decay - step_size * m / (math.sqrt(v) / root_correction + hyper[EPS])


@numba.njit(nogil=True, inline="always")
def ftrl_row(row, grad, hyper):  # type: ignore[no-untyped-def]
    """FTRL-proximal per coordinate: z, n accumulate; w is their closed-form minimiser."""
    dim = grad.shape[0]
    alpha, beta, l1, l2 = hyper[LR], hyper[BETA1], hyper[L1], hyper[L2]
    for d in range(dim):
        g = grad[d]
        n = row[2 * dim + d]
        new_n = n + g * g
        sigma = (math.sqrt(new_n) - math.sqrt(n)) / alpha
        z = row[dim + d] + g - sigma * row[d]
        row[dim + d] = z
        row[2 * dim + d] = new_n
        if abs(z) <= l1:
            row[d] = 0.0
        else:
            row[d] = -(z - math.copysign(l1, z)) / ((beta + math.sqrt(new_n)) / alpha + l2)

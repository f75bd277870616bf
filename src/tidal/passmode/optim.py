"""The sparse optimizers of `tidal.optim.rowwise` on rows held in torch tensors.

A pass's rows live in two device tensors: `values` `[R, D]` and `state` `[R, W]`, the
optimizer state in the layout of `tidal.optim.rowwise` (W may be wider than a table's
own state width: its rows use the first columns). `update_rows` applies one step to
some rows given their summed gradients, with the formulas and the precision of the
store's compiled kernels (float32 where they compute in float32, float64 where they
do), so rows move between the store and a device without conversion, and a pass
trains them as the store would.
"""

from __future__ import annotations

import torch

from tidal.optim import rowwise as rw

__all__ = ["update_rows"]


def update_rows(kernel: rw.OptimizerKernel, values: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
                grad: torch.Tensor, step: int, lr_scale: float = 1.0) -> None:
    """One optimizer step of `kernel` on rows `slots` ([U] int64, distinct) of `values`
    and `state`, given each row's summed gradient `grad` ([U, D] float32). `step` is the
    table's optimizer step (Adam's bias correction without per-row steps); `lr_scale`
    multiplies its learning rate."""
    width = kernel.state_width
    rows = values.index_select(0, slots)  # [U, D]
    own = state[:, :width]
    new_values, new_state = _UPDATES[kernel.code](rows, own.index_select(0, slots), grad, kernel.hyper_at(lr_scale), step)
    values.index_copy_(0, slots, new_values.to(values.dtype))
    if width:
        own.index_copy_(0, slots, new_state.to(state.dtype))


def _sgd(w, s, g, hyper, step):  # type: ignore[no-untyped-def]
    return w - _f32(hyper[rw.LR], g) * g, s


def _adagrad(w, s, g, hyper, step):  # type: ignore[no-untyped-def]
    s = s + g * g
    return w - _f32(hyper[rw.LR], g) * g / (_sqrt32(s) + _f32(hyper[rw.EPS], g)), s


def _rowwise_adagrad(w, s, g, hyper, step):  # type: ignore[no-untyped-def]
    dim = g.shape[1]
    acc = s[:, 0].double() + (g.double() ** 2).sum(1) / dim  # [U]
    scale = _f64(hyper[rw.LR], acc) / (torch.sqrt(acc) + hyper[rw.EPS])
    return w.double() - scale[:, None] * g.double(), acc[:, None]


def _adam_t(s, dim, hyper, step):  # type: ignore[no-untyped-def]
    """The bias-correction step of each row ([U, 1] float64) and the state with it."""
    if hyper[rw.PER_ROW_STEP] == 0.0:
        return torch.full((s.shape[0], 1), float(step), dtype=torch.float64, device=s.device), s
    s = s.clone()
    s[:, 2 * dim] += 1.0
    return s[:, 2 * dim :].double(), s


def _adam(w, s, g, hyper, step):  # type: ignore[no-untyped-def]
    dim, b1, b2 = g.shape[1], hyper[rw.BETA1], hyper[rw.BETA2]
    t, s = _adam_t(s, dim, hyper, step)
    step_size = hyper[rw.LR] * torch.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    m_old, v_old, g64 = s[:, :dim], s[:, dim : 2 * dim], g.double()
    m = m_old + (g - m_old).double() * (1.0 - b1)
    v = v_old + (g * g - v_old).double() * (1.0 - b2)
    return w - step_size * m / (torch.sqrt(v) + hyper[rw.EPS]), _with_moments(s, m, v, dim, g64)


def _adamw(w, s, g, hyper, step):  # type: ignore[no-untyped-def]
    dim, b1, b2, lr = g.shape[1], hyper[rw.BETA1], hyper[rw.BETA2], hyper[rw.LR]
    t, s = _adam_t(s, dim, hyper, step)
    g64 = g.double()
    m = b1 * s[:, :dim].double() + (1.0 - b1) * g64
    v = b2 * s[:, dim : 2 * dim].double() + (1.0 - b2) * g64 * g64
    step_size, root_correction = _f64(lr, t) / (1.0 - b1**t), torch.sqrt(1.0 - b2**t)
    decayed = w.double() * (1.0 - lr * hyper[rw.WEIGHT_DECAY])
    return decayed - step_size * m / (torch.sqrt(v) / root_correction + hyper[rw.EPS]), _with_moments(s, m, v, dim, g64)


def _with_moments(s, m, v, dim, like):  # type: ignore[no-untyped-def]
    """The state `s` with its first and second moments replaced by `m` and `v`."""
    s = s.to(like.dtype)
    s[:, :dim], s[:, dim : 2 * dim] = m, v
    return s


def _ftrl(w, s, g, hyper, step):  # type: ignore[no-untyped-def]
    dim = g.shape[1]
    alpha, beta, l1, l2 = hyper[rw.LR], hyper[rw.BETA1], hyper[rw.L1], hyper[rw.L2]
    n = s[:, dim:]
    new_n = n + g * g  # float32, as the kernel adds it
    root_new = _sqrt32(new_n)  # float32 roots and their difference, as the kernel takes them
    z = (s[:, :dim] + g).double() - (root_new - _sqrt32(n)).double() / _f64(alpha, g) * w.double()
    shrunk = -(z - torch.sign(z) * l1) / ((beta + root_new.double()) / _f64(alpha, g) + l2)
    return torch.where(z.abs() <= l1, torch.zeros_like(z), shrunk), torch.cat([z.to(n.dtype), new_n], dim=1)


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """A hyper-parameter rounded to float32, as the kernels read it."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _f64(value: float, like: torch.Tensor) -> torch.Tensor:
    """A hyper-parameter as a tensor: torch divides by a Python number through its
    reciprocal, one rounding more than the kernels' division."""
    return torch.tensor(value, dtype=torch.float64, device=like.device)


def _sqrt32(x: torch.Tensor) -> torch.Tensor:
    """The float32 square root rounded as numpy's and the kernels' (torch's own float32
    one on the CPU is off by an ulp now and then)."""
    return torch.sqrt(x.double()).to(x.dtype)


_UPDATES = {rw.SGD: _sgd, rw.ADAGRAD: _adagrad, rw.ROWWISE_ADAGRAD: _rowwise_adagrad, rw.ADAM: _adam,
            rw.ADAMW: _adamw, rw.FTRL: _ftrl}

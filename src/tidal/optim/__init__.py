"""Sparse optimizers applied row-wise, with their state stored next to each row.

`OptimizerKernel(config, dim).update(row, grad, step)` applies one step to a single
row from Python; the store's compiled kernels use `rowwise`'s functions directly."""

from tidal.optim.rowwise import OptimizerKernel

__all__ = ["OptimizerKernel"]

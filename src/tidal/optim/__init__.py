"""Sparse optimizers applied row-wise, with their state stored next to each row."""

from tidal.optim.rowwise import OptimizerKernel, update_row

__all__ = ["OptimizerKernel", "update_row"]

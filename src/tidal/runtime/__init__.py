"""Training runtimes: the single-process reference trainer and the heterogeneous
engine (sparse workers feeding dense workers) with its local and Ray backends."""

from tidal.runtime.engine import Engine, Ticket
from tidal.runtime.local import LocalBackend
from tidal.runtime.telemetry import Telemetry
from tidal.runtime.trainer import Evaluation, Trainer
from tidal.runtime.workers import DenseWorker, EmbeddingShard, SparseWorker

__all__ = ["DenseWorker", "EmbeddingShard", "Engine", "Evaluation", "LocalBackend", "SparseWorker", "Telemetry",
           "Ticket", "Trainer"]

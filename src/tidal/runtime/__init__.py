"""Training runtimes; for now the single-process reference trainer."""

from tidal.runtime.trainer import Evaluation, Trainer

__all__ = ["Evaluation", "Trainer"]

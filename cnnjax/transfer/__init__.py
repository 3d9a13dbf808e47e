"""Transfer learning experiments on top of the engine: from scratch vs pretrained."""

from cnnjax.transfer.compare import ARMS, run_transfer

__all__ = ["ARMS", "run_transfer"]

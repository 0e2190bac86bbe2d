"""mt-packing: balanced LPT packing of variable-length samples into ranks and minibatches.

Depends on numpy and numba only (no torch), so it can be used by any trainer.
"""

from mt_packing.lpt import lpt_slot_assignment, pack_minibatches

__all__ = ["lpt_slot_assignment", "pack_minibatches"]
__version__ = "0.1.0"

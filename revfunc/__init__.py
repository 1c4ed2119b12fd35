"""revfunc: reversible residual networks as pure functions on torch.func.

Core names are re-exported here; see ``revfunc.nn`` for the drop-in container modules,
``revfunc.random`` for explicit randomness and ``revfunc.testing`` for property tests.
"""

from revfunc.coupling import coupling, coupling_inverse
from revfunc.functional import merge_buffers, pure, pure_blocks, split_buffers
from revfunc.invertible import Invertible
from revfunc.routing import layer_drop, route_args
from revfunc.sequence import (
    ReconstructionError,
    reconstruction_error,
    reversible_inverse,
    reversible_sequence,
    sequential_sequence,
)
from revfunc.vjp import reversible_vjp

__version__ = "0.1.0"

__all__ = [
    "coupling",
    "coupling_inverse",
    "Invertible",
    "pure",
    "pure_blocks",
    "split_buffers",
    "merge_buffers",
    "reversible_sequence",
    "reversible_inverse",
    "reversible_vjp",
    "sequential_sequence",
    "reconstruction_error",
    "ReconstructionError",
    "route_args",
    "layer_drop",
]

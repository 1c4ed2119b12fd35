"""Property-test reversible stacks of your own blocks.

    from revfunc.testing import assert_invertible, assert_gradients_match
    from revfunc.testing import strategies   # needs hypothesis

Assertions raise ``AssertionError`` naming the block, the tensor, the max abs/rel error
and the tolerance; default tolerances per dtype are in :data:`DEFAULT_TOLERANCES`.
``strategies`` is imported on first use, so the assertions work without hypothesis.
"""

from revfunc._tolerances import DEFAULT_TOLERANCES, default_tolerances
from revfunc.testing._asserts import assert_gradients_match, assert_invertible, assert_logdet_matches

__all__ = [
    "assert_invertible",
    "assert_gradients_match",
    "assert_logdet_matches",
    "DEFAULT_TOLERANCES",
    "default_tolerances",
    "strategies",
]


def __getattr__(name):
    if name == "strategies":
        import importlib

        return importlib.import_module("revfunc.testing.strategies")
    raise AttributeError(f"module 'revfunc.testing' has no attribute {name!r}")

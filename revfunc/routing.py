"""Route keyword arguments to blocks, and draw which layers to drop.

Both are seed-compatible with the classic container: the same routes and, for the same
RNG state, the same kept layers. Unlike it, a keyword the router does not route and a
route whose length is not ``depth`` are errors instead of being silently dropped.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from revfunc import _checks

__all__ = ["route_args", "layer_drop", "check_router"]

Router = Mapping[str, Sequence[Tuple[bool, bool]]]


def check_router(where: str, router: Any, depth: int) -> None:
    """``router`` maps names to ``depth`` pairs ``(to_f, to_g)`` of bools."""
    if not isinstance(router, Mapping):
        raise TypeError(
            _checks.msg(where, "router", "a dict {name: ((to_f, to_g),) * depth}", _checks.describe(router))
        )
    for name, route in router.items():
        if not isinstance(route, (list, tuple)):
            raise TypeError(
                _checks.msg(where, f"router[{name!r}]", "a sequence of (to_f, to_g) pairs", _checks.describe(route))
            )
        if len(route) != depth:
            raise ValueError(
                f"{where}: router[{name!r}] has {len(route)} (to_f, to_g) pairs but depth={depth}; give one per block."
            )
        for i, pair in enumerate(route):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise TypeError(
                    _checks.msg(where, f"router[{name!r}][{i}]", "a pair (to_f, to_g)", _checks.describe(pair))
                )


def route_args(router: Router, kwargs: Mapping[str, Any], depth: int) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Split call keywords into one ``(f_kwargs, g_kwargs)`` pair per block.

    Args:
        router: ``{name: ((to_f, to_g),) * depth}``: for block ``i``, ``kwargs[name]``
            goes to ``f`` if ``to_f`` and to ``g`` if ``to_g``.
        kwargs: the keywords of one call.
        depth: the number of blocks.

    Returns:
        ``[(f_kwargs, g_kwargs)] * depth`` (fresh dicts; values are not copied).

    Pure: yes.

    Raises:
        ValueError: a keyword that ``router`` does not route; a route whose length is
            not ``depth``.

    Example:
        >>> route_args({"mask": ((True, False),) * 2}, {"mask": 1}, 2)
        [({'mask': 1}, {}), ({'mask': 1}, {})]
    """
    where = "revfunc.route_args"
    check_router(where, router, depth)
    unrouted = sorted(set(kwargs) - set(router))
    if unrouted:
        raise ValueError(
            _checks.msg(
                where,
                "kwargs",
                f"only keywords the router routes ({sorted(router)})",
                f"unrouted {unrouted}",
                "Add them to the router (args_route), or do not pass them.",
            )
        )
    routed: List[Tuple[Dict[str, Any], Dict[str, Any]]] = [({}, {}) for _ in range(depth)]
    for name, value in kwargs.items():
        for (f_kwargs, g_kwargs), (to_f, to_g) in zip(routed, router[name]):
            if to_f:
                f_kwargs[name] = value
            if to_g:
                g_kwargs[name] = value
    return routed


def layer_drop(depth: int, prob: float, generator: Optional[torch.Generator] = None) -> List[int]:
    """Indices of the layers kept by layer dropout (never empty).

    One uniform draw per layer, in layer order (``torch.rand(depth, generator=...)``,
    the same numbers as the classic ``torch.empty(depth).uniform_(0, 1)``); layer ``i``
    is dropped if its draw is ``< prob``. If every layer is dropped, layer 0 is kept.

    Pure: advances ``generator`` (the global CPU RNG if ``None``) by ``depth`` draws.

    Raises:
        ValueError: ``depth < 1`` or ``prob`` outside ``[0, 1]``.

    Example:
        >>> layer_drop(4, 0.0)
        [0, 1, 2, 3]
        >>> layer_drop(4, 1.0)
        [0]
    """
    where = "revfunc.layer_drop"
    _checks.check_positive_int(where, "depth", depth, allow_none=False)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(_checks.msg(where, "prob", "a probability in [0, 1]", repr(prob)))
    device = generator.device if generator is not None else "cpu"
    draws = torch.rand(depth, generator=generator, device=device)
    keep = (draws >= prob).nonzero().flatten().tolist()
    return keep or [0]

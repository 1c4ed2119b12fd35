"""Invertible layers between couplings: what mixes the two halves of a flow.

An element of ``blocks`` is either a coupling pair ``(f, g)`` or an :class:`Invertible`
layer (``../shared/DESIGN.md`` §1c). The block walk treats a layer as it treats a
branch: the memory-saving backward rebuilds the layer's input from its output with
``inverse``, recomputes ``forward`` and back-propagates through it, so nothing is stored
per layer; the layer's log-det adds to the stack's.

Built-ins (each a pure function of its parameter dict):

- :func:`permute`: a fixed permutation of ``cat([x1, x2], dim)``, split back into halves
  (FrEIA's ``PermuteRandom``; volume preserving);
- :func:`lu_linear` with :func:`lu_linear_params`: a learned invertible linear map of the
  same concatenation (Glow's invertible 1x1 convolution in LU form), exact log-det;
- :func:`actnorm` with :func:`actnorm_params`: a per-channel affine map with Glow's
  data-dependent initialization.

Example:
    >>> import torch, revfunc
    >>> from revfunc.invertible import permute
    >>> layer = permute(torch.tensor([3, 2, 1, 0]))
    >>> x1, x2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 3.0]])
    >>> y1, y2, logdet = layer.forward({}, x1, x2)
    >>> y1.tolist(), y2.tolist(), float(logdet)
    ([[3.0, 2.0]], [[1.0, 0.0]], 0.0)
    >>> [t.tolist() for t in layer.inverse({}, y1, y2)]
    [[[0.0, 1.0]], [[2.0, 3.0]]]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from revfunc import _checks

__all__ = ["Invertible", "permute", "lu_linear", "lu_linear_params", "actnorm", "actnorm_params", "from_freia"]


class Invertible:
    """An invertible layer of a stack: ``forward(params, x1, x2, **kwargs) -> (y1, y2, logdet)``
    and ``inverse(params, y1, y2, **kwargs) -> (x1, x2)``.

    ``logdet`` is the log-determinant of the layer's Jacobian per sample, broadcastable to
    ``x1.shape[:-event_dim]`` (a scalar for a map that is the same for every sample; ``0``
    for a volume-preserving one), in the stack's ``event_dim`` convention. Both functions
    must be pure and deterministic: the backward calls ``inverse`` to rebuild the input
    and ``forward`` again to differentiate it. The halves keep their shapes and dtype.

    Its entry in ``params`` is its own dict (``{}`` when it has none); its entry in
    ``kwargs`` (if any) a pair ``(layer_kwargs, {})``, as :func:`revfunc.route_args`
    builds for a block.

    Args:
        forward, inverse: as above.
        name: what messages call it (default: ``forward``'s name).
        vjp: optional, ``vjp(params, x1, x2, dy1, dy2, dlogdet, **kwargs) -> (dx1, dx2,
            dparams)``: the closed-form pullback of ``forward`` at ``(x1, x2)`` for the
            cotangents of its halves and of its per-sample log-det (``dlogdet``, shaped
            ``x1.shape[:-event_dim]``, or ``None``), with ``dparams`` a dict of the
            parameters' gradients (a name left out gets none). The backward then skips
            recomputing ``forward`` (``permute`` has one: its transpose is its inverse).
            Where a keyword tensor needs a gradient, autograd on ``forward`` is used
            instead. A wrong one is caught by ``revfunc.testing.assert_gradients_match``.
    """

    __slots__ = ("forward", "inverse", "name", "vjp")

    def __init__(
        self, forward: Callable, inverse: Callable, name: Optional[str] = None, vjp: Optional[Callable] = None
    ) -> None:
        where = "revfunc.Invertible"
        for arg, fn in (("forward", forward), ("inverse", inverse)):
            if not callable(fn):
                raise TypeError(_checks.msg(where, arg, "a callable", _checks.describe(fn)))
        if vjp is not None and not callable(vjp):
            raise TypeError(_checks.msg(where, "vjp", "None or a callable", _checks.describe(vjp)))
        self.forward = forward
        self.inverse = inverse
        self.vjp = vjp
        self.name = name if name is not None else getattr(forward, "__name__", type(forward).__name__)

    def __repr__(self) -> str:
        return f"Invertible({self.name})"


def _check_dim(where: str, dim: Any, event_dim: Any) -> Tuple[int, int]:
    for arg, value in (("dim", dim), ("event_dim", event_dim)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(_checks.msg(where, arg, "an int", _checks.describe(value)))
    if event_dim < 1:
        raise ValueError(_checks.msg(where, "event_dim", "an int >= 1", repr(event_dim)))
    if dim >= 0:
        raise ValueError(
            _checks.msg(
                where,
                "dim",
                "a negative dimension (counted from the end: -1 for features, -3 for the channels of (B, C, H, W))",
                repr(dim),
                "Negative dims keep the layer valid under vmap, which removes the batch dimension.",
            )
        )
    if -dim > event_dim:
        raise ValueError(
            _checks.msg(
                where,
                "dim",
                f"one of the last event_dim={event_dim} dimensions (the per-sample event)",
                repr(dim),
                "Pass event_dim as for the stack (3 for images (B, C, H, W) with dim=-3).",
            )
        )
    return dim, event_dim


def _join(x1: torch.Tensor, x2: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat([x1, x2], dim)


def _split(x: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    a, b = x.chunk(2, dim)
    return a, b


def permute(perm: torch.Tensor, dim: int = -1) -> Invertible:
    """A fixed permutation of ``x = cat([x1, x2], dim)``: ``y = x.index_select(dim, perm)``,
    split back into halves. Log-det 0. FrEIA's ``PermuteRandom`` is
    ``permute(module.perm, dim=-3)`` for images ``(B, C, H, W)`` and ``permute(module.perm)``
    for vectors ``(B, C)``.

    Args:
        perm: a permutation of ``range(2 * x1.shape[dim])`` (an integer tensor).
        dim: the (negative) dimension the halves were split along.

    Returns:
        An :class:`Invertible` with no parameters (its ``params`` entry is ``{}``).
    """
    where = "revfunc.invertible.permute"
    if not isinstance(perm, torch.Tensor) or perm.dim() != 1 or perm.is_floating_point() or perm.is_complex():
        raise TypeError(_checks.msg(where, "perm", "a 1-D integer tensor", _checks.describe(perm)))
    perm = perm.long()
    if not torch.equal(perm.sort().values, torch.arange(len(perm), device=perm.device)):
        raise ValueError(
            _checks.msg(where, "perm", f"a permutation of range({len(perm)})", "repeated or missing entries")
        )
    _check_dim(where, dim, -dim)
    inverse_perm = torch.empty_like(perm)
    inverse_perm[perm] = torch.arange(len(perm), device=perm.device)
    on: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def indices(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if device not in on:
            on[device] = (perm.to(device), inverse_perm.to(device))
        return on[device]

    def check(x1: torch.Tensor) -> None:
        if x1.dim() < -dim or 2 * x1.shape[dim] != len(perm):
            raise ValueError(
                _checks.msg(
                    where,
                    "the stream",
                    f"halves of size {len(perm) // 2} along dim {dim} (for a permutation of {len(perm)})",
                    f"shape {tuple(x1.shape)}",
                )
            )

    def forward(params, x1, x2):
        check(x1)
        y = _join(x1, x2, dim).index_select(dim, indices(x1.device)[0])
        y1, y2 = _split(y, dim)
        return y1, y2, x1.new_zeros(())

    def inverse(params, y1, y2):
        check(y1)
        x = _join(y1, y2, dim).index_select(dim, indices(y1.device)[1])
        return _split(x, dim)

    def vjp(params, x1, x2, dy1, dy2, dlogdet):  # a permutation's transpose is its inverse
        dx1, dx2 = inverse(params, dy1, dy2)
        return dx1, dx2, {}

    return Invertible(forward, inverse, name=f"permute({len(perm)}, dim={dim})", vjp=vjp)


def _positions(x1: torch.Tensor, dim: int, event_dim: int) -> int:
    """Per sample, how many positions a map over ``dim`` acts at (the other event dims)."""
    event = x1.shape[x1.dim() - event_dim :]
    return math.prod(event) // event[dim] if event[dim] else 0


def _lu_factors(params: Dict[str, torch.Tensor], dtype: torch.dtype):
    """``(P, L, U)`` in ``dtype``: ``L`` unit lower triangular, ``U = triu(upper, 1) +
    diag(sign * exp(log_scale))``."""
    lower, upper = params["lower"].to(dtype), params["upper"].to(dtype)
    eye = torch.eye(lower.shape[-1], dtype=dtype, device=lower.device)
    L = torch.tril(lower, -1) + eye
    U = torch.triu(upper, 1) + torch.diag_embed((params["sign"] * torch.exp(params["log_scale"])).to(dtype))
    return params["permutation"].to(dtype), L, U


def _lu_weight(params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``W = P L U`` (:func:`_lu_factors`), in the parameters' dtype."""
    P, L, U = _lu_factors(params, params["lower"].dtype)
    return P @ L @ U


def _lu_check(where: str, params: Dict[str, torch.Tensor], x1: torch.Tensor, dim: int) -> None:
    c = params["log_scale"].shape[-1]
    if x1.dim() < -dim or 2 * x1.shape[dim] != c:
        raise ValueError(
            _checks.msg(
                where,
                "the stream",
                f"halves of size {c // 2} along dim {dim} (its parameters are for {c} channels)",
                f"shape {tuple(x1.shape)}",
            )
        )


def lu_linear(dim: int = -1, event_dim: int = 1) -> Invertible:
    """A learned invertible linear map over the channels of ``x = cat([x1, x2], dim)``:
    ``y = W x`` at every position (Glow's invertible 1x1 convolution, in LU form), split
    back into halves. ``W = P L U`` with ``P`` a fixed permutation, ``L`` unit lower
    triangular and ``U`` upper triangular with diagonal ``sign * exp(log_scale)``, so
    ``log|det W| = sum(log_scale)`` exactly, and the log-det per sample is that times the
    number of positions (the sizes of the other event dimensions: ``H * W`` for images).
    The inverse solves the two triangular systems (no matrix inverse).

    Args:
        dim: the (negative) channel dimension (``-1`` for vectors, ``-3`` for ``(B, C, H, W)``).
        event_dim: the stack's ``event_dim``; ``dim`` must be one of those dimensions.

    Params (from :func:`lu_linear_params`): ``lower``, ``upper``, ``log_scale`` (learned),
    ``permutation``, ``sign`` (fixed buffers).

    Example:
        >>> import torch
        >>> layer, p = lu_linear(), lu_linear_params(4, generator=torch.Generator().manual_seed(0))
        >>> x1, x2 = torch.randn(3, 2), torch.randn(3, 2)
        >>> y1, y2, logdet = layer.forward(p, x1, x2)
        >>> back = layer.inverse(p, y1, y2)
        >>> bool(torch.allclose(back[0], x1, atol=1e-5) and torch.allclose(back[1], x2, atol=1e-5))
        True
    """
    where = "revfunc.invertible.lu_linear"
    dim, event_dim = _check_dim(where, dim, event_dim)

    def forward(params, x1, x2):
        _lu_check(where, params, x1, dim)
        w = _lu_weight(params).to(x1.dtype)
        y = torch.movedim(torch.movedim(_join(x1, x2, dim), dim, -1) @ w.mT, -1, dim)
        y1, y2 = _split(y, dim)
        return y1, y2, params["log_scale"].sum().to(x1.dtype) * _positions(x1, dim, event_dim)

    def inverse(params, y1, y2):
        _lu_check(where, params, y1, dim)
        y = torch.movedim(_join(y1, y2, dim), dim, -1)  # (..., C): rows are positions
        P, L, U = _lu_factors(params, y.dtype)
        shape = y.shape
        rows = (y.reshape(-1, shape[-1]) @ P).mT  # P^T y per position: (C, N)
        a = torch.linalg.solve_triangular(L, rows, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(U, a, upper=True)
        return _split(torch.movedim(x.mT.reshape(shape), -1, dim), dim)

    return Invertible(forward, inverse, name=f"lu_linear(dim={dim})")


def lu_linear_params(
    channels: int,
    *,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> Dict[str, torch.Tensor]:
    """Parameters of :func:`lu_linear` for ``channels`` (``2 * x1.shape[dim]``), initialized
    at a random rotation, as Glow does: the LU factors (``torch.linalg.lu``) of the Q of a
    Gaussian matrix's QR. Plain tensors: call ``.requires_grad_()`` on (or wrap as
    ``nn.Parameter``) ``lower``, ``upper`` and ``log_scale`` to train them.

    Returns:
        ``{"lower": (C, C), "upper": (C, C), "log_scale": (C,), "permutation": (C, C), "sign": (C,)}``.
    """
    where = "revfunc.invertible.lu_linear_params"
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2 or channels % 2:
        raise ValueError(_checks.msg(where, "channels", "an even int >= 2 (both halves)", repr(channels)))
    dtype = dtype or torch.get_default_dtype()
    gaussian = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(gaussian).Q
    p, lower, upper = torch.linalg.lu(q)
    diag = torch.diagonal(upper)
    out = {
        "lower": torch.tril(lower, -1),
        "upper": torch.triu(upper, 1),
        "log_scale": diag.abs().log(),
        "permutation": p,
        "sign": diag.sign(),
    }
    return {k: v.to(dtype=dtype, device=device) for k, v in out.items()}


def actnorm(dim: int = -1, event_dim: int = 1) -> Invertible:
    """Glow's ActNorm over the channels of ``x = cat([x1, x2], dim)``:
    ``y = (x + bias) * exp(log_scale)`` per channel, split back into halves; log-det
    ``sum(log_scale)`` times the number of positions (as :func:`lu_linear`).

    Params (from :func:`actnorm_params`): ``bias``, ``log_scale``, each ``(C,)``.
    """
    where = "revfunc.invertible.actnorm"
    dim, event_dim = _check_dim(where, dim, event_dim)

    def shaped(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.to(x.dtype).reshape((-1,) + (1,) * (-dim - 1))

    def forward(params, x1, x2):
        _lu_check(where, params, x1, dim)
        x = _join(x1, x2, dim)
        y = (x + shaped(params["bias"], x)) * torch.exp(shaped(params["log_scale"], x))
        y1, y2 = _split(y, dim)
        return y1, y2, params["log_scale"].sum().to(x1.dtype) * _positions(x1, dim, event_dim)

    def inverse(params, y1, y2):
        _lu_check(where, params, y1, dim)
        y = _join(y1, y2, dim)
        return _split(y * torch.exp(-shaped(params["log_scale"], y)) - shaped(params["bias"], y), dim)

    return Invertible(forward, inverse, name=f"actnorm(dim={dim})")


def actnorm_params(x1: torch.Tensor, x2: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> Dict[str, torch.Tensor]:
    """Glow's data-dependent initialization of :func:`actnorm`, a plain step before
    training: from a batch ``(x1, x2)`` reaching the layer, the ``bias`` and ``log_scale``
    that give each channel of its output zero mean and unit variance on that batch.

    Returns:
        ``{"bias": (C,), "log_scale": (C,)}`` (plain tensors, no grad).
    """
    with torch.no_grad():
        x = torch.movedim(_join(x1, x2, dim), dim, -1).reshape(-1, 2 * x1.shape[dim])
        mean, std = x.mean(0), x.std(0, unbiased=False)
        return {"bias": -mean, "log_scale": -torch.log(std + eps)}


def from_freia(inn) -> Tuple[list, list]:
    """``(blocks, params)`` of a FrEIA ``SequenceINN`` of ``GLOWCouplingBlock`` and
    ``PermuteRandom`` (FrEIA 0.2), with the same weights (its live tensors: training one
    trains the other). Run it with ``coupling=revfunc.couplings.affine(clamp=module.clamp)``
    on ``x.chunk(2, 1)``: the same ``z`` and log-det, at memory constant in depth.

    The correspondence: GLOW's ``subnet2`` (of ``x2``, updating ``x1``) is ``f``, its
    ``subnet1`` (of the new ``x1``, updating ``x2``) is ``g``; ``PermuteRandom`` is
    :func:`permute` of its ``perm`` along the channel dimension.

    Raises:
        TypeError: a module of another kind, a conditional block, another clamp
            activation, halves of unequal size, or unequal clamps (one ``affine`` serves all).
    """
    import revfunc

    where = "revfunc.invertible.from_freia"
    blocks: list = []
    params: list = []
    clamps = set()
    ndims = len(inn.shapes[0]) if hasattr(inn, "shapes") else 1
    for k, module in enumerate(inn.module_list):
        kind = type(module).__name__
        if kind == "GLOWCouplingBlock":
            act = module.f_clamp
            atan = getattr(act, "__code__", None) is not None and "atan" in act.__code__.co_names
            if module.conditional or module.split_len1 != module.split_len2 or not atan:
                raise TypeError(
                    _checks.msg(
                        where,
                        f"module_list[{k}]",
                        "an unconditional GLOWCouplingBlock with split_len=0.5 and clamp_activation='ATAN'",
                        f"{kind}(conditional={module.conditional}, split {module.split_len1}/{module.split_len2})",
                    )
                )
            clamps.add(module.clamp)
            (f, fp), (g, gp) = revfunc.pure(module.subnet2), revfunc.pure(module.subnet1)
            blocks.append((f, g))
            params.append((fp, gp))
        elif kind == "PermuteRandom":
            blocks.append(permute(module.perm.detach(), dim=-ndims))
            params.append({})
        else:
            raise TypeError(_checks.msg(where, f"module_list[{k}]", "a GLOWCouplingBlock or a PermuteRandom", kind))
    if len(clamps) > 1:
        raise TypeError(_checks.msg(where, "the GLOW blocks", "one clamp for all", repr(sorted(clamps))))
    return blocks, params

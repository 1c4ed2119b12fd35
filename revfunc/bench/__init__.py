"""What reversibility costs in time and saves in memory: ``python -m revfunc.bench``.

Compares, on the same pre-norm blocks (causal ``F.scaled_dot_product_attention`` +
GELU feed-forward, :mod:`revfunc.testing.blocks`) and inputs, in one process and
interleaved: ``plain`` autograd on the coupling math (= 1.0), ``checkpoint``
(``torch.utils.checkpoint`` per block, non-reentrant), the ``classic`` ``reversible.py``
when found, and ``revfunc`` (:class:`revfunc.nn.ReversibleSequence`); optionally the
``torch.func`` paths and compiled steps. The parts, one module each:

- :mod:`revfunc.bench.cli`: the command line, presets and the run (``main``);
- :mod:`revfunc.bench.cases`: the methods as runnable training steps;
- :mod:`revfunc.bench.measure`: peak memory of one step in a fresh process, saved bytes
  and timings (the memory tests measure with the same code);
- :mod:`revfunc.bench.fit`: the memory-budget fit;
- :mod:`revfunc.bench.report`: the tables, the headline and the plots;
- :mod:`revfunc.bench.drift`: reconstruction drift and autocast gradient error.
"""

from revfunc.bench.cli import PRESETS, main, methods, parse_args
from revfunc.bench.fit import budget_table
from revfunc.bench.report import render_drift_markdown, render_headline, render_markdown, render_tables

__all__ = [
    "main",
    "parse_args",
    "methods",
    "PRESETS",
    "budget_table",
    "render_markdown",
    "render_tables",
    "render_headline",
    "render_drift_markdown",
]

"""Figures in the docs are the benchmark's own output, embedded verbatim.

``python -m revfunc.bench --out docs/generated`` (and ``--drift``, and
``python -m revfunc.bench.sharded --out docs/generated/sharded``, ``python -m
revfunc.bench.flows --out docs/generated/flows``) write ``*.json`` and
``*.md``; docs embed each ``*.md`` between ``<!-- generated: docs/generated/NAME.md -->``
and ``<!-- end generated -->``. These tests fail when an embedded copy differs from the
generated file, or when a generated file is not what the current renderer makes of its
JSON (the format changed without a rerun).
"""

import json
import pathlib
import re

import pytest

from revfunc import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Files with a JSON sibling come from the benchmark and must re-render identically;
# the memory tables (tests/test_memory.py) are checked as embedded copies only.
GENERATED = sorted(p for p in (ROOT / "docs" / "generated").rglob("*.md") if p.with_suffix(".json").exists())
HEADLINES = sorted((ROOT / "docs" / "generated").rglob("headline.md"))
EMBED = re.compile(r"<!-- generated: (?P<path>\S+) -->\n(?P<body>.*?)<!-- end generated -->", re.S)


def embedded():
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        for match in EMBED.finditer(doc.read_text()):
            yield doc.name, match.group("path"), match.group("body")


def test_docs_embed_generated_figures():
    assert {path for _, path, _ in embedded()} >= {"docs/generated/bench.md", "docs/generated/drift.md"}


@pytest.mark.parametrize("doc, path, body", list(embedded()), ids=lambda v: str(v)[:40])
def test_embedded_copy_equals_the_generated_file(doc, path, body):
    assert body == (ROOT / path).read_text(), f"{doc} embeds an outdated copy of {path}: rerun the bench and re-embed"


@pytest.mark.parametrize("md", GENERATED, ids=lambda p: p.name)
def test_generated_file_is_the_renderer_output_of_its_json(md):
    result = json.loads(md.with_suffix(".json").read_text())
    if "sharded" in result:
        from revfunc.bench import sharded

        render = sharded.render_markdown
    elif "rows" in result and "methods" in result:
        from revfunc.bench import flows

        render = flows.render
    else:
        drift = "drift" in result or "coupling_drift" in result
        render = bench.render_drift_markdown if drift else bench.render_markdown
    assert render(result) == md.read_text()


@pytest.mark.parametrize("md", HEADLINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_headline_is_the_renderer_output_of_its_runs_json(md):
    assert bench.render_headline(json.loads(md.with_name("bench.json").read_text())) == md.read_text()


def embed() -> None:
    """Rewrite every embedded block from its generated file: ``python tests/test_docs.py``."""
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        text = doc.read_text()
        new = EMBED.sub(
            lambda m: (
                f"<!-- generated: {m.group('path')} -->\n{(ROOT / m.group('path')).read_text()}<!-- end generated -->"
            ),
            text,
        )
        if new != text:
            doc.write_text(new)
            print("updated", doc.relative_to(ROOT))


if __name__ == "__main__":
    embed()

"""Every notebook runs top to bottom and its own asserts hold.

The notebooks are committed with their outputs (so a reader sees the plot); this test
runs a fresh copy. Regenerate the stored outputs with ``python tests/test_notebooks.py``.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    # A generous per-cell timeout: a loaded 2-core machine must not fail a notebook.
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()


if __name__ == "__main__":
    import tempfile

    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory() as work:
            NotebookClient(
                notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": work}}
            ).execute()
        nbformat.write(notebook, path)
        print("executed and saved", path.name)

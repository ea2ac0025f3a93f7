"""notebooks/tour.ipynb, the notebook tour: stored without outputs, and run here cell by cell in a
fresh kernel (nbclient + ipykernel, the ``tour`` extra) on a small made-up text, as CI has no
internet for tiny Shakespeare. A cell that raises fails the test."""

import json
from pathlib import Path

import pytest

from tests.helpers import make_text

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "tour.ipynb"
ARCHITECTURES = ["gpt", "rnn", "backpack", "cnn"]


def test_the_tour_is_stored_without_outputs():
    """Outputs would put a machine's paths, timings and megabytes of pages into every diff."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code and nb["metadata"]["kernelspec"]["name"] == "python3"
    assert [i for i, cell in enumerate(code) if cell["outputs"] or cell["execution_count"] is not None] == []


@pytest.mark.e2e
def test_the_tour_runs_from_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    text = tmp_path / "text.txt"
    text.write_text(make_text(), encoding="utf-8")
    monkeypatch.setenv("GPTNANO_TOUR_TEXT", str(text))  # the kernel inherits this environment
    monkeypatch.setenv("GPTNANO_TOUR_STEPS", "20")  # a few steps: the test is that every cell runs
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, naming the cell and its traceback, at the first cell that raises.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert [out for out in outputs if out.output_type == "error"] == []
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    shown = [out.data for out in outputs if out.output_type in ("display_data", "execute_result")]
    assert f"{text}: {len(make_text()):,} characters" in printed and "trained 4 models" in printed
    table = next(data["text/markdown"] for data in shown if "text/markdown" in data)
    assert [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]] == ARCHITECTURES
    assert "| 20 |" in table  # every model trained GPTNANO_TOUR_STEPS steps and validated at the last
    assert any("image/png" in data for data in shown)  # the curves were plotted (matplotlib: the extra has it)
    frames = [data["text/html"] for data in shown if "text/html" in data and "<iframe srcdoc" in data["text/html"]]
    assert len(frames) == 4 and all("gptnano-inspect" in frame for frame in frames)
    runs = tmp_path / "tour-runs"
    assert sorted(p.name for p in runs.glob("inspect-*.html")) == sorted(f"inspect-{a}.html" for a in ARCHITECTURES)
    assert sorted(p.name for p in (runs / "checkpoints").iterdir()) == sorted(ARCHITECTURES)
    assert all(f"----- {a}\n" in printed for a in ARCHITECTURES)  # a sample from each

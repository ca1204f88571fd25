"""What an executed notebook showed: the checks every notebook test shares."""

from __future__ import annotations


def stderr_cells(nb) -> list[tuple[int, str]]:
    """(cell index, text) of every stderr output: red text a user would see under a cell.

    Example:
        >>> import nbformat
        >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])
        >>> nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr", text="E!")]
        >>> stderr_cells(nb)
        [(0, 'E!')]
    """
    return [(i, o.get("text", "")) for i, c in enumerate(nb.cells) for o in c.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == "stderr"]


def assert_quiet(nb, name: str) -> None:
    """Fail naming each cell that showed stderr, with the first lines of what it showed."""
    shown = stderr_cells(nb)
    assert not shown, f"{name}: {len(shown)} stderr output(s):\n" + "\n".join(
        f"  cell {i} ({nb.cells[i].source.splitlines()[0][:50]!r}): {text[:300]!r}"
        for i, text in shown)

"""The tabular reader's fast paths give what the exact paths give: a block with nothing to settle line by line goes
straight to polars, missing cells are nulled by the parser, numbers are cast before the text is stripped (and
again from the stripped text only in a chunk where that fails)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_transfer.data import tabular
from recsys_transfer.data.prepared import BuildReport
from recsys_transfer.data.schema import FileFormat, load_schema
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.errors import DataError


def _lines(rng: np.random.Generator, n: int, bad: bool) -> list[str]:
    """Rows of a 4-column CSV (a,b,c,d); with ``bad``, some blocks get blank lines, short and long lines (also
    a short and a long one in the same block, so the block's delimiter total is right), quoted cells holding the
    delimiter, quoted empty cells and `?`."""
    out = []
    for i in range(n):
        cells = [f"k{rng.integers(0, 50)}", str(rng.integers(-5, 500)), "" if rng.random() < 0.2 else "x" * 40, "?"]
        out.append(",".join(cells))
    if bad:
        for i in range(0, n, 97):  # every 97th line, one kind of trouble
            kind = (i // 97) % 6
            out[i] = {0: "", 1: "k1,2,3", 2: "k1,2,3,4,5", 3: '"k,1",7,"",?', 4: 'k2,"",x,"?"', 5: out[i]}[kind]
            if kind == 5 and i + 1 < n:  # a short and a long line next to each other
                out[i], out[i + 1] = "k3,4,5", "k3,4,5,6,7"
    return out


def _read(path: Path, fmt: FileFormat, on_bad_row: str, chunk_rows: int) -> tuple[pl.DataFrame, dict]:
    report = BuildReport()
    frames = list(tabular.read_cells([path], fmt, chunk_rows=chunk_rows, on_bad_row=on_bad_row, report=report))
    return pl.concat(frames), {"input_rows": report.input_rows, **report.skip_reasons}


@pytest.mark.parametrize("quote", ['"', None])
def test_fast_path_reads_what_the_exact_path_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quote):
    rng = np.random.default_rng(0)
    clean, dirty = _lines(rng, 6000, bad=False), _lines(rng, 6000, bad=True)  # blocks of 64 KiB: ~6 each
    path = tmp_path / "t.csv"
    path.write_text("a,b,c,d\n" + "\n".join(clean + dirty + clean) + "\n")
    fmt = FileFormat(delimiter=",", header=True, quote=quote, na_values=("?",))
    calls = {"fast": 0}
    fast_path = tabular._TextReader._parse_regular

    def counted(self, block, data):
        out = fast_path(self, block, data)
        calls["fast"] += out is not None
        return out

    monkeypatch.setattr(tabular._TextReader, "_parse_regular", counted)
    fast, fast_report = _read(path, fmt, "skip", chunk_rows=1000)
    assert calls["fast"] >= 3  # the clean blocks took it
    monkeypatch.setattr(tabular._TextReader, "_parse_regular", lambda self, block, data: None)
    exact, exact_report = _read(path, fmt, "skip", chunk_rows=1000)
    assert fast.equals(exact) and fast_report == exact_report
    assert fast_report["input_rows"] == 18000 and fast_report["blank line"] > 0
    assert fast_report["wrong field count"] > 0
    if quote is None:  # quotes are text: `"?"` is not `?`
        assert set(fast["d"].drop_nulls()) == {'"?"'}
    else:
        assert fast["d"].null_count() == len(fast)  # `?` is missing, quoted or not
        assert '"' not in "".join(fast["a"].drop_nulls()) and "k,1" in fast["a"].to_list()
        assert fast.filter(pl.col("a") == "k2")["b"].null_count() > 0  # a quoted empty cell is missing too


def test_fast_path_errors_name_the_same_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A short and a long line in one block keep the block's delimiter total right: polars refuses the long one,
    and the exact path names the first bad line."""
    rows = ["k,1,x,y"] * 50
    rows[20], rows[30] = "k,1,x", "k,1,x,y,z"
    path = tmp_path / "t.csv"
    path.write_text("a,b,c,d\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"t\.csv:22: expected 4 fields separated by ',', found 3"):
        list(tabular.read_cells([path], FileFormat(quote=None), chunk_rows=1000))


def _schema(tmp_path: Path) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text("""name: spaces
format: {delimiter: ",", header: true}
columns:
  - {name: i, kind: int_bucketized}
  - {name: f, kind: dense}
  - {name: t, kind: timestamp}
  - {name: y, kind: label}
""")
    return p


def test_numbers_with_spaces_read_as_the_stripped_text(tmp_path: Path):
    """A chunk whose numbers all cast as they are skips stripping; one with spaces around a number is typed
    again from the stripped text; both give the values of the stripped text."""
    rows = [f"{k % 40},{k / 8},{1_000 + k},{k % 2}" for k in range(400)]
    spaced = [f" {k % 40},{k / 8} ,{1_000 + k} , {k % 2}" for k in range(400)]
    plain_csv, spaced_csv = tmp_path / "plain.csv", tmp_path / "spaced.csv"
    plain_csv.write_text("i,f,t,y\n" + "\n".join(rows) + "\n")
    spaced_csv.write_text("i,f,t,y\n" + "\n".join(rows[:200] + spaced[200:]) + "\n")
    schema = load_schema(_schema(tmp_path))
    split = SplitSpec(kind="temporal")
    outs = []
    for k, path in enumerate([plain_csv, spaced_csv]):
        meta = tabular.prepare_tabular(schema, [path], tmp_path / f"o{k}", split=split, head_tail=HeadTailSpec(),
                                       chunk_rows=100, progress=False)
        assert meta.total_rows == 400 and meta.skipped_rows == 0
        outs.append({s: pl.read_parquet(tmp_path / f"o{k}" / s) for s in ("train", "valid", "test")})
    for s in ("train", "valid", "test"):
        assert outs[0][s].equals(outs[1][s]), s
    bad = tmp_path / "bad.csv"
    bad.write_text("i,f,t,y\n" + "\n".join(rows[:150] + [" 1 2,0.5,7,1"] + rows[150:]) + "\n")
    with pytest.raises(DataError, match=r"bad\.csv:152: column 'i': expected an integer, got ' 1 2'"):
        tabular.prepare_tabular(schema, [bad], tmp_path / "o_bad", split=split, head_tail=HeadTailSpec(),
                                chunk_rows=100, progress=False)

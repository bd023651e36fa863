"""Training data in, named typed columns out: the readers behind `ss.Baseline.from_data`.

Every input form (CSV, Parquet, JSONL, .npy/.npz, numpy arrays, a dict of columns, a list of
rows, a pandas DataFrame) becomes `{name: prepared column}` where a prepared column is a float64
array with NaN for nulls (numeric) or an object array of strings with None for nulls
(categorical and boolean, booleans as "true"/"false"). Kinds are inferred the same way for every
form, so the same data gives the same statistics whatever it came in:

- numbers (Python or numpy ints and floats) are numeric; None and NaN are nulls;
- booleans are boolean; strings are categorical; other objects (dates, ...) are categorical
  by their `str()`;
- a column mixing numbers with strings or booleans is an error naming the column (pass
  `kinds={name: "categorical"}` to keep it as text);
- a column with no non-null value is an error naming the column (leave it out with
  `exclude=[name]`: a baseline cannot describe a feature it never saw);
- CSV cells are untyped text: a column whose non-empty cells all parse as floats is numeric,
  one of only true/false (any case) is boolean, one of text alone categorical, and one mixing
  numbers with text an error as above; empty, NA, N/A, null, NULL, None and nan cells are nulls.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import numbers
import operator
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import numpy as np

from safeserve.errors import SafeServeError

Kind = Literal["numeric", "categorical", "boolean"]
KINDS: tuple[Kind, ...] = ("numeric", "categorical", "boolean")


_OPTIONS = {
    "bins": "--bins",
    "top_k": "--top-k",
    "owners": "--owner",
    "kinds": "--kind",
    "exclude": "--exclude",
    "prediction": "--prediction",
    "confidence": "--confidence",
    "feature_names": "--feature-names",
}
_cli_spelling: ContextVar[bool] = ContextVar("safeserve_cli_spelling", default=False)


@contextmanager
def cli_spelling() -> Iterator[None]:
    """Within this block, problems name the `safeserve baseline` flags (`--kind a=categorical`)
    instead of the Python arguments (`kinds={'a': 'categorical'}`)."""
    token = _cli_spelling.set(True)
    try:
        yield
    finally:
        _cli_spelling.reset(token)


def option(name: str) -> str:
    """An option's name as the user typed it: `kinds` in Python, `--kind` on the command line."""
    return _OPTIONS.get(name, name) if _cli_spelling.get() else name


def about(name: str, column: str) -> str:
    """The prefix of a problem with `column` given to option `name`: `kinds: a` / `--kind a`."""
    return f"{_OPTIONS.get(name, name)} {column}" if _cli_spelling.get() else f"{name}: {column}"


def fix(name: str, column: str, value: str | None = None) -> str:
    """How to pass `column` (and `value`) to option `name`, spelled for Python or the CLI."""
    if _cli_spelling.get():
        flag = _OPTIONS[name]
        return f"{flag} {column}" + (f"={value}" if value is not None else "")
    if value is None:
        return f"{name}=[{column!r}]"
    return f"{name}={{{column!r}: {value!r}}}"


class BaselineError(SafeServeError, ValueError):
    """Data or a baseline file cannot be used; `problems` holds one line per problem, each
    naming the column (or file) it is about."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def read_columns(
    data: Any, feature_names: Sequence[str] | None = None, text: frozenset[str] = frozenset()
) -> tuple[int, dict[str, np.ndarray]]:
    """The rows count and raw columns of any supported input form; CSV columns named in `text`
    are kept as text (not parsed as numbers)."""
    if isinstance(data, str | Path):
        return _read_path(Path(data), feature_names, text)
    if isinstance(data, np.ndarray):
        return _from_array(data, feature_names, "array")
    if isinstance(data, Mapping):
        return _from_dict(data)
    if _is_dataframe(data):
        return _from_dataframe(data)
    if isinstance(data, Sequence) and all(isinstance(r, Mapping) for r in data):
        return _from_rows(data)
    raise BaselineError(
        [
            f"data: unsupported input {type(data).__name__}; expected a path (.csv, .parquet, "
            ".jsonl, .npy, .npz), a numpy array, a dict of columns, a list of dict rows or a "
            "pandas DataFrame"
        ]
    )


def prepare(name: str, raw: np.ndarray, kind: Kind | None = None) -> tuple[Kind, np.ndarray]:
    """Infer (or apply) a column's kind; numeric -> float64 with NaN, else str objects/None."""
    if raw.ndim != 1:
        raise BaselineError([f"{name}: a column must be one-dimensional, got shape {raw.shape}"])
    code = raw.dtype.kind
    if code == "O" and kind is not None:  # forced: no inference, so mixed values can be text
        return kind, _convert(name, raw, kind)
    if code == "O":
        inferred, column = _prepare_objects(name, raw)
    elif code in "iuf":
        inferred, column = "numeric", raw.astype(np.float64, copy=False)
    elif code == "b":
        inferred, column = "boolean", np.where(raw, "true", "false").astype(object)
    elif code in "US":
        inferred, column = "categorical", raw.astype(str).astype(object)
    elif code in "Mm":
        column = raw.astype(str).astype(object)
        column[np.isnat(raw)] = None
        inferred = "categorical"
    else:
        raise BaselineError([f"{name}: unsupported dtype {raw.dtype}"])
    if kind is None or kind == inferred:
        return inferred, column
    return kind, _convert(name, raw, kind)


# -- kinds ------------------------------------------------------------------------------------
_NULL_TYPE = type(None)


def _prepare_objects(name: str, raw: np.ndarray) -> tuple[Kind, np.ndarray]:
    values = raw.tolist()
    types = set(map(type, values)) - {_NULL_TYPE}
    bools = {t for t in types if issubclass(t, bool | np.bool_)}
    nums = {t for t in types - bools if issubclass(t, numbers.Number)}
    texts = {t for t in types if issubclass(t, str)}
    if nums and (texts or bools or types - nums):
        if all(issubclass(t, float) for t in nums) and not any(
            isinstance(v, float) and not math.isnan(v) for v in values
        ):
            nums = set()  # only NaN among the strings (pandas' missing value): nulls
        else:
            raise BaselineError(
                [
                    f"{name}: mixes numbers with {'strings' if texts else 'other values'}; "
                    f"clean the column or pass {fix('kinds', name, 'categorical')}"
                ]
            )
    if nums:
        return "numeric", np.array(values, dtype=np.float64)
    if bools and types == bools:
        return "boolean", _as_keys(raw)
    return "categorical", _as_keys(raw)


def _convert(name: str, raw: np.ndarray, kind: Kind) -> np.ndarray:
    """A column forced to `kind` (the `kinds=` override)."""
    if kind != "numeric":
        keys = _as_keys(raw)
        if kind == "boolean":
            lowered = [k if k is None else k.lower() for k in keys.tolist()]
            if not set(lowered) <= {"true", "false", None}:
                raise BaselineError([f"{name}: cannot be boolean (values other than true/false)"])
            keys[:] = lowered
        return keys
    try:
        if raw.dtype.kind == "b":
            raise ValueError
        return np.array([None if _is_null(v) else v for v in raw.tolist()], dtype=np.float64)
    except (TypeError, ValueError):
        raise BaselineError([f"{name}: cannot be numeric (values that are not numbers)"]) from None


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _key(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    return str(value)


def _as_keys(raw: np.ndarray) -> np.ndarray:
    """Values as category strings (booleans "true"/"false"), None for nulls."""
    values = raw.tolist()
    out = np.empty(len(values), dtype=object)
    out[:] = [None if _is_null(v) else _key(v) for v in values]
    return out


# -- in-memory forms --------------------------------------------------------------------------
def _from_array(
    arr: np.ndarray, names: Sequence[str] | None, where: str
) -> tuple[int, dict[str, np.ndarray]]:
    if arr.dtype.names:
        return len(arr), {n: np.asarray(arr[n]) for n in arr.dtype.names}
    if arr.ndim == 1 and names is not None and len(names) == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise BaselineError([f"{where}: expected a structured or 2-D array, got shape {arr.shape}"])
    if names is None or len(names) != arr.shape[1]:
        names_option = option("feature_names")
        raise BaselineError(
            [f"{where}: a 2-D array needs {names_option}, one per column ({arr.shape[1]})"]
        )
    return arr.shape[0], {str(n): arr[:, j] for j, n in enumerate(names)}


def _column(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _from_dict(data: Mapping[Any, Any]) -> tuple[int, dict[str, np.ndarray]]:
    columns = {str(k): _column(v) for k, v in data.items()}
    lengths = {len(c) for c in columns.values()}
    if len(lengths) > 1:
        sizes = ", ".join(f"{k}={len(c)}" for k, c in columns.items())
        raise BaselineError([f"data: columns differ in length ({sizes})"])
    return (lengths.pop() if lengths else 0), columns


def _from_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[int, dict[str, np.ndarray]]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        columns[str(name)] = _column([row.get(name) for row in rows])
    return len(rows), columns


def _is_dataframe(data: Any) -> bool:
    return type(data).__name__ == "DataFrame" and hasattr(data, "columns")


def _from_dataframe(df: Any) -> tuple[int, dict[str, np.ndarray]]:
    pd = importlib.import_module("pandas")  # only reached with a DataFrame in hand

    api = pd.api.types
    columns: dict[str, np.ndarray] = {}
    for name in df.columns:
        s = df[name]
        if api.is_bool_dtype(s.dtype) and not s.hasnans:
            columns[str(name)] = s.to_numpy(dtype=bool)
        elif api.is_numeric_dtype(s.dtype) and not api.is_bool_dtype(s.dtype):
            columns[str(name)] = s.to_numpy(dtype=np.float64, na_value=np.nan)
        elif api.is_datetime64_any_dtype(s.dtype):
            columns[str(name)] = _column([None if pd.isna(v) else str(v) for v in s])
        else:
            columns[str(name)] = s.astype(object).where(s.notna(), None).to_numpy(dtype=object)
    return len(df), columns


# -- files ------------------------------------------------------------------------------------
def _read_path(
    path: Path, names: Sequence[str] | None, text: frozenset[str]
) -> tuple[int, dict[str, np.ndarray]]:
    suffix = path.suffix.lower()
    if path.is_dir():
        raise BaselineError([f"{path}: is a directory, not a data file"])
    if not path.is_file():
        raise BaselineError([f"{path}: no such file"])
    if path.stat().st_size == 0:
        raise BaselineError([f"{path}: empty file"])
    if suffix in {".csv", ".txt"}:
        return read_csv(path, text)
    if suffix in {".jsonl", ".ndjson"}:
        return _read_jsonl(path)
    if suffix in {".parquet", ".pq"}:
        return _read_parquet(path)
    if suffix == ".npy":
        return _from_array(np.load(path, allow_pickle=False), names, str(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        if len(arrays) == 1 and next(iter(arrays.values())).ndim != 1:
            return _from_array(next(iter(arrays.values())), names, str(path))
        return _from_dict(arrays)
    raise BaselineError(
        [f"{path}: unknown file type {suffix!r} (.csv, .parquet, .jsonl, .ndjson, .npy, .npz)"]
    )


def read_csv(path: Path, keep: frozenset[str] = frozenset()) -> tuple[int, dict[str, np.ndarray]]:
    """A CSV file with a header line, each column typed from its text (see the module doc);
    columns named in `keep` stay text."""
    with path.open("rb") as f:
        head = f.read(1 << 16).decode("utf-8-sig", errors="ignore")
    first, _, rest = head.partition("\n")
    header = next(csv.reader([first.rstrip("\r")]), [])
    if not any(header):
        raise BaselineError([f"{path}: no header line"])
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise BaselineError([f"{path}: duplicate column name {d!r}" for d in duplicates])
    sample = rest.partition("\n")[0].rstrip("\r").split(",")
    if not keep & set(header):
        fast = _numeric_with_pyarrow(path, header)
        if fast is not None:
            return fast
    if not keep & set(header) and len(sample) == len(header) and all(map(_parses, sample)):
        grid = _numeric_grid(path, len(header), skip=1)
        if grid is not None:
            return grid.shape[0], {name: grid[:, j] for j, name in enumerate(header)}
    numbers_only = len(sample) == len(header) and all(_parses(c) for c in sample if c)
    if not keep & set(header) and numbers_only and len(header) > 1:
        grid = _numeric_with_holes(path, len(header))
        if grid is not None:
            return grid.shape[0], {name: grid[:, j] for j, name in enumerate(header)}
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BaselineError([f"{path}: not UTF-8 text"]) from None
    body = text.replace("\r\n", "\n").partition("\n")[2]
    body = body.removesuffix("\n")
    if not body.strip("\n"):
        raise BaselineError([f"{path}: no rows after the header"])
    cells = _text_grid(path, body, len(header))
    columns = {}
    for j, name in enumerate(header):
        column = cells[:, j]
        columns[name] = _as_keys(_nulls_to_none(column)) if name in keep else _typed(name, column)
    return cells.shape[0], columns


_CHUNK = 1 << 20


def _numeric_with_pyarrow(
    path: Path, header: list[str]
) -> tuple[int, dict[str, np.ndarray]] | None:
    """An all-numeric CSV through pyarrow's multithreaded reader, when pyarrow is installed
    (the `parquet` extra); None for anything else, which the readers below handle."""
    try:
        import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
        import pyarrow.csv as pacsv  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                null_values=[*NULL_TEXT, "nan", "NaN"], strings_can_be_null=True
            ),
        )
    except (pa.ArrowInvalid, OSError):
        return None
    if table.column_names != header or not all(
        pa.types.is_integer(t) or pa.types.is_floating(t) for t in table.schema.types
    ):
        return None
    columns = {
        name: table.column(name).to_numpy(zero_copy_only=False).astype(float, copy=False)
        for name in header
    }
    return table.num_rows, columns


def _numeric_with_holes(path: Path, width: int) -> np.ndarray | None:
    """Numeric cells, some empty: filled with "nan" and read by numpy's C reader about a
    megabyte at a time (copies of a whole large file are slow; small ones reuse memory)."""
    parts = []
    with path.open("rb") as f:
        f.readline()  # the header
        while chunk := f.read(_CHUNK):
            chunk += f.readline()  # up to the end of the line
            try:
                text = chunk.decode("utf-8").replace("\r\n", "\n").removesuffix("\n")
            except UnicodeDecodeError:
                return None
            grid = _numeric_grid(io.StringIO(_fill_empty(text)), width, skip=0)
            if grid is None:
                return None
            parts.append(grid)
    return np.concatenate(parts) if parts else None


def _fill_empty(body: str) -> str:
    """Empty cells as "nan", so numpy's C reader takes numeric files with holes too."""
    text = body.replace(",,", ",nan,").replace(",,", ",nan,")
    text = text.replace("\n,", "\nnan,").replace(",\n", ",nan\n")
    text = "nan" + text if text.startswith(",") else text
    return text + "nan" if text.endswith(",") else text


def _numeric_grid(source: Path | io.StringIO, width: int, skip: int) -> np.ndarray | None:
    """Every cell a float, none empty: numpy's C reader (about 1 s per 20 M cells); None when
    the file is not like that (the general reader then takes over)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            grid = np.loadtxt(
                source,
                delimiter=",",
                skiprows=skip,
                dtype=np.float64,
                ndmin=2,
                comments=None,
                encoding="utf-8-sig",
            )
    except (ValueError, UserWarning):
        return None
    return grid if grid.shape[1] == width and grid.shape[0] else None


def _text_grid(path: Path, body: str, width: int) -> np.ndarray:
    """rows x columns of str cells: a quick split unless the file quotes its cells. Blank lines
    are skipped, except in a one-column file, where they are empty (null) cells."""
    if '"' in body:
        rows = [r or [""] for r in csv.reader(io.StringIO(body))]
        if width > 1:
            rows = [r for r in rows if r != [""]]
        bad = [i for i, r in enumerate(rows) if len(r) != width]
    else:
        lines = body.split("\n")
        blanks = width > 1 and "" in lines
        if blanks:
            lines = [line for line in lines if line]
        commas = np.fromiter(map(operator.methodcaller("count", ","), lines), int, len(lines))
        bad = np.flatnonzero(commas != width - 1).tolist()
    if bad:
        raise BaselineError(
            [
                f"{path}: row {i + 1} has a different number of fields than the header"
                for i in bad[:5]
            ]
        )
    if '"' in body:
        grid = np.empty((len(rows), width), dtype=object)
        grid[:] = rows
        return grid
    flat = ",".join(lines).split(",") if blanks else body.replace("\n", ",").split(",")
    return np.array(flat, dtype=object).reshape(-1, width)


_TRUE_FALSE = frozenset({"true", "false"})
NULL_TEXT = ("", "NA", "N/A", "null", "NULL", "None")
"""CSV cells read as nulls (besides "nan", which parses as a float NaN)."""


_NULL_SET = frozenset(NULL_TEXT)


def _null_mask(cells: np.ndarray) -> np.ndarray:
    return np.fromiter(map(_NULL_SET.__contains__, cells.tolist()), bool, cells.size)


def _nulls_to_none(cells: np.ndarray) -> np.ndarray:
    out = cells.copy()
    out[_null_mask(cells)] = None
    return out


def _parses(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _typed(name: str, cells: np.ndarray) -> np.ndarray:
    """One CSV column's text as floats (NaN for nulls), booleans or strings (None for nulls)."""
    empty = _null_mask(cells)
    filled = cells[~empty] if empty.any() else cells
    try:
        numbers_ = filled.astype(np.float64)
    except ValueError:
        pass
    else:
        out = np.full(len(cells), np.nan)
        out[~empty] = numbers_
        return out
    distinct = set(filled.tolist())
    column = np.empty(len(cells), dtype=object)
    if {d.lower() for d in distinct} <= _TRUE_FALSE:
        column[~empty] = np.char.lower(filled.astype(str)) == "true"
    elif any(map(_parses, distinct)):  # mixed: left as numbers and strings, for `prepare` to name
        column[~empty] = [float(c) if _parses(c) else c for c in filled.tolist()]
    else:
        column[~empty] = filled
    column[empty] = None
    return column


def _read_jsonl(path: Path) -> tuple[int, dict[str, np.ndarray]]:
    try:
        import orjson

        loads: Any = orjson.loads
        errors: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
    except ImportError:
        loads, errors = json.loads, (json.JSONDecodeError,)
    rows: list[Mapping[str, Any]] = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = loads(line)
            except errors:
                raise BaselineError([f"{path}:{lineno}: not a JSON line"]) from None
            if not isinstance(row, dict):
                raise BaselineError([f"{path}:{lineno}: not a JSON object"])
            rows.append(row)
    if not rows:
        raise BaselineError([f"{path}: no rows"])
    return _from_rows(rows)


def _read_parquet(path: Path) -> tuple[int, dict[str, np.ndarray]]:
    try:
        pa = importlib.import_module("pyarrow")
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise BaselineError(
            [f"{path}: reading Parquet needs pyarrow (pip install 'safeserve[parquet]')"]
        ) from None
    table = pq.read_table(path)
    columns: dict[str, np.ndarray] = {}
    for name, chunks in zip(table.column_names, table.columns, strict=True):
        col, kind = chunks, chunks.type
        if pa.types.is_dictionary(kind):
            col, kind = col.cast(kind.value_type), kind.value_type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            columns[name] = col.cast(pa.float64()).to_numpy()
        elif pa.types.is_boolean(kind) and col.null_count == 0:
            columns[name] = col.to_numpy()
        elif (
            pa.types.is_boolean(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
        ):
            columns[name] = _column(col.to_pylist())
        else:
            columns[name] = _column(col.cast(pa.string()).to_pylist())
    return table.num_rows, columns

"""Reading time series and the Time-Series-Library benchmark protocol.

(Over 400 lines and one concern: most of it is the checks of what users pass, each with a message naming the row,
the column and the fix.)

A series is held as a *wide* DataFrame: a ``DatetimeIndex`` (regular, unique, increasing) and one numeric column per
channel, like ETT, ECL, Traffic and Weather CSVs. The *long* format of Nixtla and GluonTS users (columns
``unique_id, ds, y``) converts to and from it with :func:`long_to_wide` / :func:`wide_to_long`.

The protocol (thuml/Time-Series-Library) is kept exactly, because published numbers depend on it:

* ETTh1/ETTh2: rows [0, 8640) train, [8640, 11520) validation, [11520, 14400) test (12/4/4 months of hours);
  ETTm1/ETTm2: the same borders times 4 (15-minute data). Rows after the test border are unused.
* Any other series (ECL, Traffic, Weather, your CSV): 70/10/20 chronological split.
* Validation and test windows start ``lookback`` rows before their border, so their first target is the
  split's first row.
* The scaler is fit on the training rows only; metrics are computed on the scaled values.
* Windows have stride 1 and every test window is evaluated (no ``drop_last``).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from memorycore.errors import InputError

#: Benchmark names (lower case, as found in file names) and the split protocol each uses.
KNOWN_DATASETS = {
    "etth1": "etth", "etth2": "etth", "ettm1": "ettm", "ettm2": "ettm",
    "ecl": "ratio", "electricity": "ratio", "traffic": "ratio", "weather": "ratio",
}
PROTOCOLS = ("auto", "etth", "ettm", "ratio")
DATE_COLUMN_NAMES = ("date", "ds", "timestamp", "datetime", "time")
LONG_COLUMNS = ("unique_id", "ds", "y")
FILL_METHODS = (None, "interpolate")

_ETT_HOUR_BORDERS = (12 * 30 * 24, 4 * 30 * 24, 4 * 30 * 24)  # train / val / test rows of ETTh
_NUMERIC_DATE = re.compile(r"^(\d{1,2})[/.-](\d{1,2})[/.-]\d{2,4}(?:$|[ T])")  # 31/01/2024, 1.2.24 13:00


# ----------------------------------------------------------------------------------------------------------- reading
def read_series(
    data: str | Path | pd.DataFrame,
    *,
    date_column: str | None = None,
    target: str | list[str] | None = None,
    fill: str | None = None,
    allow_irregular: bool = False,
) -> pd.DataFrame:
    """Read a CSV / ``.csv.gz`` file or a DataFrame (wide or long) into a validated wide DataFrame.

    Parameters
    ----------
    data : path or DataFrame
        Wide: a date column (or a ``DatetimeIndex``) and numeric columns. Long: columns ``unique_id``, ``ds``, ``y``.
    date_column : str, optional
        The timestamp column of a wide table; by default the first of ``date, ds, timestamp, datetime, time``
        (any case), else the first column if all of it parses as dates.
    target : str or list of str, optional
        Keep only these columns (channels); default all numeric columns.
    fill : {None, "interpolate"}
        What to do with NaN / inf values: None raises :class:`InputError` saying where they are; ``"interpolate"``
        fills them linearly in time (and with the nearest value at the ends).
    allow_irregular : bool, default False
        Accept duplicate or unevenly spaced timestamps and use the rows as equally spaced steps, as
        Time-Series-Library does (its Weather file has one duplicate and one gap).

    Returns
    -------
    DataFrame
        Float64 values, a ``DatetimeIndex`` named after the date column, the input's column names.

    Raises
    ------
    InputError
        On a missing file, no date column, non-numeric columns, NaN/inf (without ``fill``), duplicate or irregular
        timestamps (without ``allow_irregular``) or an unknown target column.

    Examples
    --------
    >>> import pandas as pd
    >>> raw = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=4, freq="h"), "load": [1.0, 2.0, 3.0, 4.0]})
    >>> read_series(raw).shape
    (4, 1)
    """
    if fill not in FILL_METHODS:
        raise InputError(f"unknown fill method {fill!r}; use one of: interpolate")
    if not isinstance(data, (pd.DataFrame, str, os.PathLike)):
        raise InputError(f"data must be a path to a CSV or a pandas DataFrame (a date column and numeric columns), "
                         f"got {type(data).__name__}")
    frame = _read_table(data) if not isinstance(data, pd.DataFrame) else data.copy()
    if frame.empty or frame.shape[1] == 0:
        raise InputError("the data is empty; pass a CSV with a date column and at least one numeric column")
    long = set(LONG_COLUMNS) <= set(frame.columns)
    wide = long_to_wide(frame) if long else _index_by_date(frame, date_column)
    wide = _select_target(wide, target)
    _check_numeric(wide)
    wide = wide.astype(np.float64)
    _check_timestamps(wide.index, allow_irregular)
    return _handle_missing(wide, fill, ragged=long)


def _read_table(path: str | Path, rows: int | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    try:
        frame = pd.read_csv(path, nrows=rows)
        if frame.shape[1] == 1:  # one column: perhaps another separator (European CSVs use ';')
            separator = next((sep for sep in (";", "\t", "|") if sep in str(frame.columns[0])), None)
            if separator is not None:
                frame = pd.read_csv(path, nrows=rows, sep=separator)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as error:
        raise InputError(f"cannot read {path} as CSV ({error}); "
                         "pass a comma-separated file, optionally .csv.gz") from None
    return frame if rows is not None else _drop_written_row_numbers(frame)


def _drop_written_row_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop a first column that pandas' ``to_csv`` wrote as the row numbers (``Unnamed: 0`` = 0, 1, 2, ...):
    otherwise it would be forecast as a channel."""
    first = frame.columns[0] if frame.shape[1] else None
    if first == "Unnamed: 0" and np.array_equal(frame[first].to_numpy(), np.arange(len(frame))):
        warnings.warn("ignored the first column 'Unnamed: 0': it holds the row numbers pandas writes (to_csv "
                      "without index=False)", stacklevel=3)
        return frame.drop(columns=[first])
    return frame


def _index_by_date(frame: pd.DataFrame, date_column: str | None) -> pd.DataFrame:
    already_indexed = isinstance(frame.index, pd.DatetimeIndex) and (
        date_column is None or (date_column not in frame.columns and frame.index.name == date_column))
    if already_indexed:
        return frame  # by time, e.g. the output of read_series or predict (with the date column as its index)
    column = date_column if date_column is not None else _find_date_column(frame)
    if column not in frame.columns:
        raise InputError(f"date column {column!r} not found; the columns are: {', '.join(map(str, frame.columns))}")
    dates = _parse_dates(frame[column])
    if dates is None:
        raise InputError(f"column {column!r} does not hold dates ({_not_a_date(frame[column])}); fix it, or name "
                         "the timestamp column with --date-column")
    return frame.drop(columns=[column]).set_index(pd.DatetimeIndex(dates, name=str(column)))


def _find_date_column(frame: pd.DataFrame) -> str:
    by_name = {str(c).lower(): c for c in frame.columns}
    for name in DATE_COLUMN_NAMES:
        if name in by_name:
            return by_name[name]
    first = frame.columns[0]
    if frame[first].dtype == object and _parse_dates(frame[first]) is not None:
        return first
    raise InputError("no date column found: name one of the columns 'date' (or ds, timestamp, datetime, time) "
                     "or pass --date-column")


def _parse_dates(values: pd.Series) -> pd.Series | None:
    """The dates of a column, or None when it does not hold dates. Timestamps whose UTC offset changes (a time zone
    with daylight saving) are converted to UTC, where the steps stay equal; a mix of zoned and naive ones raises."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return values
    if pd.api.types.is_numeric_dtype(values):
        return None  # numbers would parse as nanoseconds since 1970: not a date column
    day_first = _day_first_example(values)
    if day_first is not None:  # pandas would read 01/02 as January 2 and 13/01 as January 13: time would go back
        raise InputError(f"column {values.name!r} holds day-first dates (e.g. {day_first!r}: no month {day_first[:2]}"
                         "); write them year-first (2024-01-31 13:00), or read them in Python with "
                         "pd.to_datetime(..., dayfirst=True) and pass the DataFrame")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pandas' note on mixed offsets; handled below
            dates = pd.to_datetime(values, format="mixed")
    except (ValueError, TypeError, OverflowError):
        dates = None
    if dates is not None and pd.api.types.is_datetime64_any_dtype(dates):
        return dates
    try:  # every value a date once offsets are allowed? (text such as state codes is not)
        utc = pd.to_datetime(values, format="mixed", utc=True)
    except (ValueError, TypeError, OverflowError):
        return None
    present = values.notna()  # a missing date is reported as such later, not as a naive one
    zoned = values[present].astype(str).str.contains(r"(?:Z|[+-]\d\d:?\d\d)$", regex=True)
    if not zoned.all():
        raise InputError(f"some timestamps carry a UTC offset and some do not (e.g. {values[present][zoned].iloc[0]!r} "
                         f"and {values[present][~zoned].iloc[0]!r}); write them all one way")
    return utc.dt.tz_localize(None)


def _day_first_example(values: pd.Series) -> str | None:
    """A value of a column of numeric ``dd/mm/yyyy`` dates whose first field cannot be a month (``"13/01/2024"``),
    or None when the column is not such dates."""
    text = values.dropna().astype(str).str.strip()
    fields = text.str.extract(_NUMERIC_DATE)
    if text.empty or fields.isna().any(axis=None):
        return None
    first, second = fields[0].astype(int), fields[1].astype(int)
    if (first > 12).any() and (second <= 12).all():
        return text[first > 12].iloc[0]
    return None


def _not_a_date(values: pd.Series) -> str:
    """Where a column that is not dates shows it, for error messages: its first value that does not parse."""
    if pd.api.types.is_numeric_dtype(values):
        return f"numbers, e.g. {values.iloc[0]}; write the dates as text such as 2024-01-31 13:00"
    parsed = pd.to_datetime(values.astype(str), format="mixed", errors="coerce", utc=True)
    row = int(np.argmax(parsed.isna().to_numpy()))
    return f"row {row} holds {values.iloc[row]!r}"


class MissingColumnsError(InputError):
    """The data lacks columns that were asked for (``target=``, or the columns a model was fitted on)."""

    def __init__(self, message: str, columns: list[str]) -> None:
        super().__init__(message)
        self.columns = columns


def _select_target(wide: pd.DataFrame, target: str | list[str] | None) -> pd.DataFrame:
    if target is None:
        return wide
    names = [target] if isinstance(target, str) else list(dict.fromkeys(target))  # each column once
    missing = [name for name in names if name not in wide.columns]
    if missing:
        raise MissingColumnsError(f"unknown target column(s) {', '.join(map(repr, missing))}; "
                                  f"the columns are: {', '.join(map(str, wide.columns))}", missing)
    return wide[names]


def _check_numeric(wide: pd.DataFrame) -> None:
    if wide.shape[1] == 0:
        raise InputError("no value columns: the data holds only the date column")
    bad = [c for c in wide.columns if not pd.api.types.is_numeric_dtype(wide[c])]
    if bad:
        first = wide[bad[0]]
        unparsed = pd.to_numeric(first, errors="coerce").isna().to_numpy() & first.notna().to_numpy()
        row = int(np.argmax(unparsed))
        where = (f"{bad[0]} holds {first.iloc[row]!r} at {wide.index[row]}" if unparsed.any()
                 else f"{bad[0]} holds numbers as text, e.g. {first.iloc[0]!r}")
        raise InputError(f"non-numeric column(s): {', '.join(map(str, bad))} ({where}); fix those values, drop the "
                         "columns, or keep only numeric columns with target= (forecast fit --target)")


def _check_timestamps(index: pd.DatetimeIndex, allow_irregular: bool) -> None:
    if index.isna().any():  # no option makes a row without a date usable
        row = int(np.argmax(index.isna()))
        raise InputError(f"row {row} has no timestamp (an empty or unreadable date); fix or drop that row")
    backwards = np.diff(index.asi8) < 0
    # A step back is refused, except with --allow-irregular where it is rare: local clock times repeat an hour when
    # daylight saving ends. A file mostly going back (written newest first) would be forecast into the past.
    if backwards.any() and (not allow_irregular or backwards.mean() > 0.5):
        row = int(np.argmax(backwards)) + 1
        raise InputError(f"timestamps go back in time at row {row} ({index[row - 1]} then {index[row]}); sort the "
                         "rows by date, oldest first (local clock times that repeat an hour when daylight saving "
                         "ends: write them with their UTC offset, or pass --allow-irregular)")
    if allow_irregular or len(index) < 3:
        return
    hint = "; fix the file or pass --allow-irregular to use the rows as equally spaced steps"
    duplicated = index.duplicated()
    if duplicated.any():
        row = int(np.argmax(duplicated))
        raise InputError(f"duplicate timestamp {index[row]} (row {row}){hint}")
    steps = np.diff(index.asi8)
    if pd.infer_freq(index) is None and not (steps == steps[0]).all():
        usual = pd.Timedelta(int(pd.Series(steps).mode().iloc[0]))
        row = int(np.argmax(steps != usual.value)) + 1
        raise InputError(f"irregular timestamps: the step is {usual} but row {row} jumps from {index[row - 1]} "
                         f"to {index[row]}{hint}")


def _handle_missing(wide: pd.DataFrame, fill: str | None, ragged: bool = False) -> pd.DataFrame:
    """NaN/inf refused or interpolated; with ``ragged`` (long input, whose series may start and end on different
    dates) the NaN before a series' first value and after its last are not missing values but outside the series:
    they stay NaN, never filled."""
    bad = ~np.isfinite(wide.to_numpy())
    if ragged:
        bad &= ~outside_series(wide)
    if not bad.any():
        return wide
    if fill is None:
        counts = bad.sum(axis=0)
        where = [f"{column} ({count} value(s), the first at {wide.index[int(np.argmax(bad[:, j]))]})"
                 for j, (column, count) in enumerate(zip(wide.columns, counts)) if count]
        more = f"; and {len(where) - 5} more columns" if len(where) > 5 else ""  # one line, even for 800 channels
        raise InputError(f"NaN/inf values in {'; '.join(where[:5])}{more}; "
                         "clean the data or pass --fill interpolate")
    if bad.all(axis=0).any():
        empty = [str(c) for c, all_bad in zip(wide.columns, bad.all(axis=0)) if all_bad]
        raise InputError(f"column(s) {', '.join(empty)} hold no finite value; nothing to interpolate from")
    cleaned = wide.mask(bad)
    if ragged:  # fill inside each series only
        return wide.where(~bad, cleaned.interpolate(method="linear", limit_area="inside"))
    return cleaned.interpolate(method="linear", limit_direction="both")


def outside_series(wide: pd.DataFrame) -> np.ndarray:
    """Boolean mask ``[time, channels]`` of the rows before each column's first non-NaN value and after its last:
    where a series of long-format data does not exist (its values are NaN in the wide frame)."""
    present = wide.notna().to_numpy()
    started = np.maximum.accumulate(present, axis=0)
    not_ended = np.maximum.accumulate(present[::-1], axis=0)[::-1]
    return ~(started & not_ended)


# ------------------------------------------------------------------------------------------------- long <-> wide
def long_to_wide(frame: pd.DataFrame) -> pd.DataFrame:
    """Pivot the long format (``unique_id, ds, y``) into a wide DataFrame indexed by ``ds``, one column per id.

    Examples
    --------
    >>> long = pd.DataFrame({"unique_id": ["a", "a", "b", "b"], "ds": ["2024-01-01", "2024-01-02"] * 2,
    ...                      "y": [1.0, 2.0, 3.0, 4.0]})
    >>> long_to_wide(long).columns.tolist()
    ['a', 'b']
    """
    missing = [c for c in LONG_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"long format needs columns unique_id, ds, y; missing: {', '.join(missing)}")
    dates = _parse_dates(frame["ds"])
    if dates is None:
        raise InputError(f"column 'ds' does not hold dates ({_not_a_date(frame['ds'])})")
    long = frame.assign(ds=dates)
    if long.duplicated(["unique_id", "ds"]).any():
        row = long[long.duplicated(["unique_id", "ds"])].iloc[0]
        raise InputError(f"duplicate timestamp {row['ds']} for unique_id {row['unique_id']!r}")
    wide = long.pivot(index="ds", columns="unique_id", values="y").sort_index()
    wide.columns = [str(c) if not isinstance(c, str) else c for c in wide.columns]
    wide.columns.name = None
    return wide


def wide_to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """The inverse of :func:`long_to_wide`: columns ``unique_id, ds, y``, sorted by id then time."""
    # built from the arrays, not with melt: a series may itself be named "y" or "ds"
    rows, ids = len(wide), [str(c) for c in wide.columns]
    long = pd.DataFrame({"unique_id": np.repeat(ids, rows), "ds": np.tile(wide.index.to_numpy(), len(ids)),
                         "y": wide.to_numpy().T.ravel()})
    return long.sort_values(["unique_id", "ds"], kind="stable").reset_index(drop=True)


def is_long_format(data: str | Path | pd.DataFrame) -> bool:
    """Whether a DataFrame, or the CSV at a path (its header is read), is in the long format (has the columns
    unique_id, ds and y)."""
    if isinstance(data, pd.DataFrame):
        return set(LONG_COLUMNS) <= set(data.columns)
    return set(LONG_COLUMNS) <= set(_read_table(data, rows=0).columns)


# ------------------------------------------------------------------------------------------------------ protocol
def dataset_name(data: str | Path | pd.DataFrame) -> str | None:
    """The benchmark name a path refers to (``"ETTh1.csv.gz" -> "etth1"``), or None when not a known dataset."""
    if isinstance(data, pd.DataFrame):
        return None
    stem = Path(data).name.lower()
    stem = re.sub(r"(\.csv)?(\.gz)?$", "", stem)
    for name in sorted(KNOWN_DATASETS, key=len, reverse=True):
        if stem == name or stem.startswith(name + "_") or stem.startswith(name + "-"):
            return name
    return None


def resolve_protocol(protocol: str = "auto", name: str | None = None) -> str:
    """The split protocol to use: ``"etth"``, ``"ettm"`` or ``"ratio"`` (70/10/20).

    ``"auto"`` picks it from the dataset name (see :data:`KNOWN_DATASETS`); unknown names use ``"ratio"``.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; use one of: {', '.join(PROTOCOLS)}")
    if protocol != "auto":
        return protocol
    return KNOWN_DATASETS.get((name or "").lower(), "ratio")


@dataclass(frozen=True)
class Split:
    """Row ranges ``[start, end)`` of the train / validation / test segments, windows included.

    ``val[0]`` and ``test[0]`` lie ``lookback`` rows before the split border so the first window's target starts at
    the border.
    """

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]


def split_borders(n_rows: int, lookback: int, protocol: str) -> Split:
    """Borders of the Time-Series-Library splits for a series of ``n_rows`` rows.

    Examples
    --------
    >>> split_borders(17420, 96, "etth")
    Split(train=(0, 8640), val=(8544, 11520), test=(11424, 14400))
    """
    if protocol in ("etth", "ettm"):
        scale = 1 if protocol == "etth" else 4
        train, val, test = (rows * scale for rows in _ETT_HOUR_BORDERS)
        if n_rows < train + val + test:
            raise InputError(f"the {protocol.upper()} protocol needs {train + val + test} rows, the series has "
                             f"{n_rows}; pass protocol='ratio' (--protocol ratio) for a 70/10/20 split")
        return Split((0, train), (train - lookback, train + val), (train + val - lookback, train + val + test))
    if protocol != "ratio":
        raise InputError(f"unknown protocol {protocol!r}; use etth, ettm or ratio")
    n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
    n_val = n_rows - n_train - n_test
    return Split((0, n_train), (n_train - lookback, n_train + n_val), (n_rows - n_test - lookback, n_rows))


def check_length(split: Split, lookback: int, horizon: int) -> None:
    """Raise :class:`InputError` unless every split holds at least one window of ``lookback + horizon`` rows."""
    for part in ("train", "val", "test"):
        start, end = getattr(split, part)
        if end - start < lookback + horizon:
            raise InputError(
                f"the series is too short: the {part} split has {end - start} rows but one window needs lookback "
                f"+ horizon = {lookback + horizon}; use a longer series or a smaller --lookback / --horizon")


# -------------------------------------------------------------------------------------------------- scaling
@dataclass
class StandardScaler:
    """Per-channel standardisation; fit it on the training rows only.

    Attributes
    ----------
    mean, scale : ndarray [channels]
        Channel means and standard deviations (population, as scikit-learn); constant channels get scale 1.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> "StandardScaler":
        """Channel statistics over the rows; NaN (where a ragged series does not exist) left out, a channel without
        any value gets NaN."""
        if np.isnan(values).any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN channel
                mean, scale = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
        else:
            mean, scale = values.mean(axis=0), values.std(axis=0)
        return cls(mean, np.where(scale > 0, scale, 1.0))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.scale

    def inverse_transform(self, values: np.ndarray) -> np.ndarray:
        return values * self.scale + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> "StandardScaler":
        return cls(np.asarray(state["mean"], dtype=np.float64), np.asarray(state["scale"], dtype=np.float64))


# -------------------------------------------------------------------------------------------------- windows
class WindowDataset(Dataset):
    """Stride-1 windows over a scaled ``[time, channels]`` array: item i is ``(x[i : i+L], x[i+L : i+L+H])``,
    followed by ``phases[i]`` (the cycle phase of the window's first row) when ``phases [time]`` is given.

    Every window is kept (``len = time - lookback - horizon + 1``): the test loader must see all of them.
    """

    def __init__(self, values: np.ndarray, lookback: int, horizon: int, phases: np.ndarray | None = None) -> None:
        self.values = torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float32)
        self.lookback, self.horizon = lookback, horizon
        self.phases = None if phases is None else torch.as_tensor(np.asarray(phases), dtype=torch.long)

    def __len__(self) -> int:
        return max(0, self.values.shape[0] - self.lookback - self.horizon + 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        middle = index + self.lookback
        window = (self.values[index:middle], self.values[middle:middle + self.horizon])
        return window if self.phases is None else (*window, self.phases[index])


@dataclass
class ProtocolData:
    """A series cut by the protocol: scaled arrays per split, the scaler (fit on train) and the borders."""

    split: Split
    scaler: StandardScaler
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def windows(self, part: str, lookback: int, horizon: int) -> WindowDataset:
        return WindowDataset(getattr(self, part), lookback, horizon)


def prepare_protocol(wide: pd.DataFrame, lookback: int, horizon: int, protocol: str) -> ProtocolData:
    """Split a wide series by ``protocol``, fit the scaler on the training rows and scale every split.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> wide = pd.DataFrame({"a": np.arange(1000.0)}, index=pd.date_range("2024", periods=1000, freq="h"))
    >>> data = prepare_protocol(wide, lookback=24, horizon=12, protocol="ratio")
    >>> len(data.windows("test", 24, 12))  # every test window: 200 rows of targets - 12 + 1
    189
    """
    split = split_borders(len(wide), lookback, protocol)
    check_length(split, lookback, horizon)
    values = wide.to_numpy(dtype=np.float64)
    scaler = StandardScaler.fit(values[split.train[0]:split.train[1]])
    unscaled = np.isnan(scaler.mean)  # a ragged series with no training value: scaled by its own values
    if unscaled.any():
        own = StandardScaler.fit(values[:, unscaled])
        scaler.mean[unscaled], scaler.scale[unscaled] = own.mean, own.scale
    scaled = scaler.transform(values)
    parts = {part: scaled[slice(*getattr(split, part))] for part in ("train", "val", "test")}
    return ProtocolData(split, scaler, **parts)


def infer_step(index: pd.DatetimeIndex) -> pd.Timedelta | pd.DateOffset:
    """The time step of a regular index (its inferred frequency, else the most common difference)."""
    freq = pd.infer_freq(index) if len(index) >= 3 else None
    if freq is not None:
        return pd.tseries.frequencies.to_offset(freq)
    steps = pd.Series(np.diff(index.asi8))
    if steps.empty:
        raise InputError("cannot infer the time step from a single timestamp")
    return pd.Timedelta(int(steps.mode().iloc[0]))


def future_index(index: pd.DatetimeIndex, steps: int) -> pd.DatetimeIndex:
    """The ``steps`` timestamps that follow ``index``; InputError if the last would fall after 2262-04-11, the
    last date pandas can hold."""
    step = infer_step(index)
    try:
        index[-1] + step * steps
    except (pd.errors.OutOfBoundsDatetime, OverflowError, ValueError):
        raise InputError(f"{steps} steps after {index[-1]} run past {pd.Timestamp.max.date()}, the last date "
                         "pandas can hold; ask for fewer steps") from None
    if isinstance(step, pd.Timedelta):
        return pd.DatetimeIndex(index[-1] + step * np.arange(1, steps + 1), name=index.name)
    return pd.DatetimeIndex([index[-1] + step * (i + 1) for i in range(steps)], name=index.name)


# ---------------------------------------------------------------------------------------------------- cycles
def step_nanoseconds(index: pd.DatetimeIndex) -> int:
    """The index's time step in nanoseconds; 0 when it has no fixed length (months, business days)."""
    try:
        return int(pd.Timedelta(infer_step(index)).value)
    except (ValueError, TypeError):
        return 0


def default_cycle_length(step_ns: int) -> int:
    """The number of steps in one day for sub-daily data (24 hourly, 96 for 15 minutes, 144 for 10 minutes), a week
    for daily data, else 0 (no cycle)."""
    day = pd.Timedelta("1D").value
    if 0 < step_ns < day and day % step_ns == 0:
        return day // step_ns
    return 7 if step_ns == day else 0


def cycle_phases(index: pd.DatetimeIndex, cycle_length: int, step_ns: int) -> np.ndarray:
    """The phase of each timestamp in a cycle of ``cycle_length`` steps of ``step_ns``: steps since the Unix epoch
    modulo the cycle (the hour of the day for hourly data and a 24-step cycle)."""
    return (index.asi8 // step_ns) % cycle_length

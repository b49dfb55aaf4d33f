"""DNA as tokens, and the loaders that read labelled sequences from disk.

(Over 400 lines and one concern: five input formats, each with the checks and messages of its own; a split into a
tokenizer and one module per format is the next step when a format is added.)

Tokenizer: one token per base, ``A C G T N`` -> 1..5, with 0 reserved for padding. Soft-masked (lowercase) bases are
accepted and upper-cased; the IUPAC ambiguity codes (R Y S W K M B D H V) become N; anything else is an error that
names the record and the 1-based position.

Loaders (every one returns :class:`SequenceData`):

- :func:`load_genomic_benchmarks`: the GenomicBenchmarks folder layout ``<name>/{train,test}/<class>/*.txt``;
  class names are sorted, so label ids never depend on the file system's listing order.
- :func:`load_table`: CSV/TSV (optionally ``.gz``) with a sequence column and a label column.
- :func:`load_fasta`: FASTA, with labels from a separate two-column file (``id`` and ``label``).
- :func:`load_bed`: regions of a FASTA given by a BED file (0-based, half-open; ``-`` strand regions are
  reverse-complemented), read through pyfaidx.
- :func:`load_sequences`: picks one of the above from the path.

:func:`iter_fasta` and :func:`iter_bed_sequences` stream one record at a time, so files larger than memory can be
classified. The pyfaidx handle lives only inside those generators: nothing picklable holds an open file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from memorycore.errors import InputError

PAD = 0
ALPHABET = "ACGTN"
VOCAB_SIZE = len(ALPHABET) + 1  # + padding
AMBIGUITY_CODES = "RYSWKMBDHV"
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas", ".ffn")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt")

_TOKEN_OF_BYTE = np.full(256, -1, dtype=np.int8)
for _token, _base in enumerate(ALPHABET, start=1):
    _TOKEN_OF_BYTE[ord(_base)] = _TOKEN_OF_BYTE[ord(_base.lower())] = _token
for _code in AMBIGUITY_CODES:
    _TOKEN_OF_BYTE[ord(_code)] = _TOKEN_OF_BYTE[ord(_code.lower())] = ALPHABET.index("N") + 1

# Token complement: pad->pad, A<->T, C<->G, N->N.
_COMPLEMENT_TOKEN = np.array([PAD, 4, 3, 2, 1, 5], dtype=np.int8)
_COMPLEMENT_TEXT = str.maketrans("ACGTRYSWKMBDHVNacgtryswkmbdhvn", "TGCAYRSWMKVHDBNtgcayrswmkvhdbn")


# --------------------------------------------------------------------------------------------------- tokenizer


def encode(sequence: str, *, record: str = "sequence") -> np.ndarray:
    """Turn a DNA string into tokens (int8, 1..5 for A C G T N; no padding).

    Parameters
    ----------
    sequence : str
        Bases; lowercase (soft-masked) and IUPAC ambiguity codes are accepted.
    record : str
        Name used in the error message (the FASTA id, file or row the sequence came from).

    Raises
    ------
    InputError
        The sequence is empty or holds a character that is not a nucleotide code.

    Examples
    --------
    >>> encode("ACgtNr").tolist()
    [1, 2, 3, 4, 5, 5]
    """
    if not isinstance(sequence, str):
        raise InputError(f"{record}: expected a DNA string, got {type(sequence).__name__}")
    if not sequence:
        raise InputError(f"{record}: the sequence is empty")
    try:
        raw = np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError as error:
        _raise_unknown_letter(record, sequence, error.start)
    tokens = _TOKEN_OF_BYTE[raw]
    bad = np.flatnonzero(tokens < 0)
    if bad.size:
        _raise_unknown_letter(record, sequence, int(bad[0]))
    return tokens


def _raise_unknown_letter(record: str, sequence: str, position: int) -> None:
    raise InputError(
        f"{record}: unknown letter {sequence[position]!r} at position {position + 1} (1-based); "
        f"DNA must use A C G T N, lowercase or IUPAC codes {AMBIGUITY_CODES}"
    )


def decode(tokens: Sequence[int] | np.ndarray) -> str:
    """Tokens back to an upper-case string (padding dropped). ``decode(encode(s))`` is ``s`` with IUPAC -> N."""
    tokens = np.asarray(tokens)
    return "".join(ALPHABET[t - 1] for t in tokens[tokens != PAD].tolist())


def reverse_complement(sequence: str) -> str:
    """Reverse complement of a DNA string; case and IUPAC codes are kept (R <-> Y, K <-> M, B <-> V, D <-> H).

    Examples
    --------
    >>> reverse_complement("AACgtN")
    'NacGTT'
    """
    return sequence.translate(_COMPLEMENT_TEXT)[::-1]


def reverse_complement_tokens(tokens: np.ndarray) -> np.ndarray:
    """Reverse complement of an unpadded token array."""
    return _COMPLEMENT_TOKEN[np.asarray(tokens)[::-1]]


def pad_tokens(token_arrays: Sequence[np.ndarray], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack token arrays into ``[n, max_length]`` int64, padded at the end with 0 and truncated to ``max_length``.

    Returns
    -------
    tokens : ndarray [n, max_length]
    lengths : ndarray [n]
        Number of real (non-padding) tokens of each row, after truncation.
    """
    out = np.zeros((len(token_arrays), max_length), dtype=np.int64)
    lengths = np.zeros(len(token_arrays), dtype=np.int64)
    for row, tokens in enumerate(token_arrays):
        n = min(len(tokens), max_length)
        out[row, :n] = tokens[:n]
        lengths[row] = n
    return out, lengths


def split_windows(tokens: np.ndarray, max_length: int) -> list[np.ndarray]:
    """Cut a long token array into windows of ``max_length`` that overlap by half and together cover every base.

    A sequence no longer than ``max_length`` is one window. The last window ends at the sequence's end.
    """
    if len(tokens) <= max_length:
        return [tokens]
    stride = max(1, max_length // 2)
    starts = list(range(0, len(tokens) - max_length, stride)) + [len(tokens) - max_length]
    return [tokens[start:start + max_length] for start in starts]


# --------------------------------------------------------------------------------------------------- containers


@dataclass
class SequenceData:
    """Sequences with their ids and (optionally) labels, as every loader returns them.

    Attributes
    ----------
    ids : list of str
        Unique record names (FASTA ids, ``<class>/<file>`` for GenomicBenchmarks folders, ``row<i>`` for tables
        without an id column).
    sequences : list of str
        DNA strings as read (case kept); tokenise with :func:`encode`.
    labels : list or None
        One label per sequence (int when every label is an integer, else str); None for unlabelled data.
    """

    ids: list[str]
    sequences: list[str]
    labels: list | None = None

    def __len__(self) -> int:
        return len(self.sequences)


# --------------------------------------------------------------------------------------------------- helpers


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{what} {path} is empty")
    return path


def _strip_gz(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8", errors="replace") if path.name.lower().endswith(".gz") \
        else open(path, "rt", encoding="utf-8", errors="replace")


def normalize_labels(labels: Sequence) -> list:
    """Labels as Python ints when every one is an integer (``"1"``, ``"1.0"``, ``1``, ``1.0``), otherwise as
    stripped str.

    Text files and tables then give the same classes, so a model fit on a CSV can be evaluated on FASTA + labels.
    """
    values = [label.item() if isinstance(label, np.generic) else label for label in labels]
    as_int = []
    for value in values:
        if isinstance(value, bool):
            break
        if isinstance(value, int):
            as_int.append(value)
        elif isinstance(value, float) and value.is_integer():
            as_int.append(int(value))
        elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.0*)?", value.strip()):  # "1" or "1.0"
            as_int.append(int(value.strip().split(".")[0]))
        else:
            break
    else:
        return as_int
    return [str(value).strip() for value in values]


# --------------------------------------------------------------------------------------------------- GenomicBenchmarks


def load_genomic_benchmarks(path: str | os.PathLike, split: str = "train") -> SequenceData:
    """Read a GenomicBenchmarks folder: ``<path>/<split>/<class>/*.txt``, one sequence per file.

    Parameters
    ----------
    path : path-like
        The dataset folder (holding ``train/`` and ``test/``), or directly a split folder holding class folders.
    split : str
        Which split to read when ``path`` holds split folders.

    Returns
    -------
    SequenceData
        Labels are the class folder names; ids are ``<class>/<file stem>``; classes and files are read in sorted
        order, so the result never depends on the file system.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist or is not a folder")
    split_dir = root / split if (root / split).is_dir() else root
    other_splits = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name in _SPLIT_NAMES)
    if split_dir == root and other_splits:
        raise InputError(f"{root} has no '{split}' split (it has {', '.join(other_splits)}); pick one of those")
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        hint = f" (no '{split}' folder either)" if split_dir == root else ""
        raise InputError(f"{split_dir} holds no class folders{hint}; expected <name>/{split}/<class>/*.txt")
    data = SequenceData([], [], [])
    for class_dir in class_dirs:
        files = sorted(class_dir.glob("*.txt"))
        if not files:
            raise InputError(f"class folder {class_dir} holds no .txt sequence files")
        for file in files:
            sequence = "".join(file.read_text(encoding="utf-8", errors="replace").split())
            if not sequence:
                raise InputError(f"sequence file {file} is empty")
            data.ids.append(f"{class_dir.name}/{file.stem}")
            data.sequences.append(sequence)
            data.labels.append(class_dir.name)
    data.labels = normalize_labels(data.labels)
    return data


# --------------------------------------------------------------------------------------------------- CSV / TSV

_SEQUENCE_COLUMNS = ("seq", "sequence", "sequences", "dna")
_LABEL_COLUMNS = ("label", "labels", "class", "target", "y")
_ID_COLUMNS = ("id", "name", "seq_id", "sequence_id")
_SPLIT_NAMES = ("train", "test", "valid", "validation", "val", "dev")  # GenomicBenchmarks-style split folders


def load_table(
    path: str | os.PathLike,
    *,
    sequence_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = False,
) -> SequenceData:
    """Read sequences (and labels) from a CSV or TSV file, optionally gzip-compressed.

    The separator follows the extension (``.csv`` comma; ``.tsv``, ``.tab``, ``.txt`` tab; otherwise sniffed).
    Columns are found by name, case-insensitively: sequence ``seq``/``sequence``, label ``label``/``class``/``y``,
    optional id ``id``/``name``, unless given explicitly.

    Parameters
    ----------
    path : path-like
    sequence_column, label_column : str, optional
        Column names to use instead of the automatic choice.
    require_labels : bool
        Raise when there is no label column (for training and evaluation).
    """
    import pandas as pd

    path = _existing_file(path, "table")
    _refuse_fastq(path)
    suffix = Path(_strip_gz(path)).suffix
    sep = "," if suffix == ".csv" else "\t" if suffix in (".tsv", ".tab", ".txt") else None
    try:
        frame = pd.read_csv(path, sep=sep, engine="c" if sep else "python", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {path} as CSV/TSV: {str(error).splitlines()[0]}") from None
    if frame.empty:
        raise InputError(f"table {path} has a header but no rows")
    columns = {str(c).strip().lower(): c for c in frame.columns}
    seq_col = _pick_column(columns, sequence_column, _SEQUENCE_COLUMNS, path, "sequence")
    label_col = _pick_column(columns, label_column, _LABEL_COLUMNS, path, "label", required=require_labels)
    id_col = _pick_column(columns, None, _ID_COLUMNS, path, "id", required=False)

    sequences = [s.strip() for s in frame[seq_col]]
    empty = [i for i, s in enumerate(sequences) if not s]
    if empty:
        raise InputError(f"{path}: empty sequence in data row {empty[0] + 1} ({len(empty)} such rows)")
    ids = [s.strip() for s in frame[id_col]] if id_col is not None else [f"row{i + 1}" for i in range(len(frame))]
    _check_unique(ids, f"{path} column {id_col!r}")
    labels = None
    if label_col is not None:
        raw = [s.strip() for s in frame[label_col]]
        missing = [i for i, s in enumerate(raw) if s == "" or s.lower() in ("nan", "na", "none")]
        if missing:
            raise InputError(f"{path}: label missing in data row {missing[0] + 1} ({len(missing)} such rows); "
                             f"every row needs a label")
        labels = normalize_labels(raw)
    return SequenceData(ids, sequences, labels)


def _pick_column(columns: dict, given: str | None, candidates: tuple, path: Path, what: str,
                 required: bool = True) -> str | None:
    if given is not None:
        if given.strip().lower() not in columns:
            raise InputError(f"{path} has no column {given!r}; columns are {list(columns.values())}")
        return columns[given.strip().lower()]
    for name in candidates:
        if name in columns:
            return columns[name]
    if required:
        raise InputError(f"{path} has no {what} column (looked for {', '.join(candidates)}); "
                         f"columns are {list(columns.values())}")
    return None


def _check_unique(ids: Sequence[str], where: str) -> None:
    seen: set[str] = set()
    for record_id in ids:
        if record_id in seen:
            raise InputError(f"{where}: duplicate id {record_id!r}; ids must be unique")
        seen.add(record_id)


# --------------------------------------------------------------------------------------------------- FASTA


def iter_fasta(path: str | os.PathLike, *, on_progress: Callable[[int], None] | None = None
               ) -> Iterator[tuple[str, str]]:
    """Stream ``(id, sequence)`` records from a FASTA file (plain or ``.gz``), one at a time.

    The id is the header up to the first whitespace. Letters are not checked here (see :func:`encode`), so
    reading stays cheap.

    Parameters
    ----------
    path : path-like
    on_progress : callable, optional
        Called with the number of bytes of the file read so far (compressed bytes for ``.gz``), after each record.

    Raises
    ------
    InputError
        Missing or empty file, text before the first header, a header without id, a record without sequence,
        a duplicate id, or no record at all.
    """
    path = _existing_file(path, "FASTA file")
    seen: set[str] = set()
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
        record_id, parts, line_number = None, [], 0
        try:
            for line_number, line in enumerate(stream, start=1):
                line = line.strip()
                if not line or line.startswith(b";"):
                    continue
                if line.startswith(b">"):
                    if record_id is not None:
                        yield _finish_record(path, record_id, parts)
                        if on_progress is not None:
                            on_progress(raw.tell())
                    record_id = _header_id(path, line, line_number, seen)
                    parts = []
                elif record_id is None:
                    if line.startswith(b"@"):
                        _refuse_fastq(path)
                    raise InputError(f"{path} is not FASTA: line {line_number} comes before any '>' header")
                else:
                    parts.append(line.decode("latin-1"))
        except (OSError, EOFError) as error:  # e.g. a truncated or fake .gz file
            raise InputError(f"cannot read {path}: {error}") from None
        if record_id is None:
            raise InputError(f"{path} holds no FASTA records (no line starts with '>')")
        yield _finish_record(path, record_id, parts)
        if on_progress is not None:
            on_progress(raw.tell())


def _header_id(path: Path, line: bytes, line_number: int, seen: set[str]) -> str:
    fields = line[1:].decode("latin-1").split()
    if not fields:
        raise InputError(f"{path}: the header on line {line_number} has no id")
    record_id = fields[0]
    if record_id in seen:
        raise InputError(f"{path}: duplicate record id {record_id!r} (line {line_number}); ids must be unique")
    seen.add(record_id)
    return record_id


def _finish_record(path: Path, record_id: str, parts: list[str]) -> tuple[str, str]:
    sequence = "".join(parts)
    if not sequence:
        raise InputError(f"{path}: record {record_id!r} has no sequence")
    return record_id, sequence


def read_label_file(path: str | os.PathLike) -> dict[str, object]:
    """Read a two-column ``id label`` file (tab, comma or whitespace separated; ``#`` comments; optional header)."""
    path = _existing_file(path, "label file")
    ids, labels = [], []
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # A tab or comma separates exactly two columns (a third is an error: it would join the label); without
            # either, the first run of spaces does, and the label may hold spaces ("no tata").
            separator = "\t" if "\t" in line else "," if "," in line else None
            fields = [f.strip() for f in (line.split(separator) if separator else line.split(None, 1))]
            if len(fields) != 2 or not fields[0] or not fields[1]:
                raise InputError(f"{path}: line {line_number} should hold an id and a label, "
                                 f"{'separated by one ' + repr(separator) if separator else 'separated by spaces'}: "
                                 f"{line!r}")
            if not ids and fields[0].lower() in _ID_COLUMNS and fields[1].lower() in _LABEL_COLUMNS:
                continue  # header
            ids.append(fields[0])
            labels.append(fields[1])
    if not ids:
        raise InputError(f"label file {path} holds no labels")
    _check_unique(ids, f"label file {path}")
    return dict(zip(ids, normalize_labels(labels)))


def attach_labels(ids: Sequence[str], label_file: str | os.PathLike) -> list:
    """Labels of ``ids`` from a two-column file; raise when some ids have none."""
    by_id = read_label_file(label_file)
    missing = [record_id for record_id in ids if record_id not in by_id]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"label file {label_file} has no label for {len(missing)} of {len(ids)} records: {shown}")
    return [by_id[record_id] for record_id in ids]


def load_fasta(path: str | os.PathLike, labels: str | os.PathLike | None = None) -> SequenceData:
    """Read a whole FASTA file, with labels from a two-column ``id label`` file when given.

    Examples
    --------
    >>> data = load_fasta("seqs.fa", labels="labels.tsv")  # doctest: +SKIP
    """
    ids, sequences = [], []
    for record_id, sequence in iter_fasta(path):
        ids.append(record_id)
        sequences.append(sequence)
    return SequenceData(ids, sequences, attach_labels(ids, labels) if labels is not None else None)


# --------------------------------------------------------------------------------------------------- FASTA + BED


@dataclass(frozen=True)
class BedRegion:
    """One BED line: 0-based half-open ``[start, end)`` on ``chrom``, with an optional name and strand."""

    chrom: str
    start: int
    end: int
    name: str
    strand: str
    line: int

    @property
    def id(self) -> str:
        """The region's name, or ``chrom:start-end(strand)`` when the BED line has none."""
        if self.name and self.name != ".":
            return self.name
        return f"{self.chrom}:{self.start}-{self.end}({self.strand})"


def iter_bed(path: str | os.PathLike) -> Iterator[BedRegion]:
    """Stream the regions of a BED file (``#``, ``track`` and ``browser`` lines are skipped).

    Raises
    ------
    InputError
        Fewer than three columns, non-integer or negative coordinates, ``end <= start``, a strand other than
        ``+ - .``, or no region at all.
    """
    path = _existing_file(path, "BED file")
    count = 0
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if not text.strip() or text.startswith(("#", "track", "browser")):
                continue
            fields = text.split("\t") if "\t" in text else text.split()
            if len(fields) < 3:
                raise InputError(f"{path}: line {line_number} has {len(fields)} column(s); BED needs chrom, start, end")
            try:
                start, end = int(fields[1]), int(fields[2])
            except ValueError:
                raise InputError(f"{path}: line {line_number}: start and end must be integers, got "
                                 f"{fields[1]!r} and {fields[2]!r}") from None
            if start < 0 or end <= start:
                raise InputError(f"{path}: line {line_number}: region [{start}, {end}) is empty or negative; BED is "
                                 f"0-based half-open, so end must be greater than start")
            strand = fields[5] if len(fields) > 5 else "+"
            if strand not in ("+", "-", "."):
                raise InputError(f"{path}: line {line_number}: strand must be +, - or ., got {strand!r}")
            name = fields[3] if len(fields) > 3 else ""
            count += 1
            yield BedRegion(fields[0], start, end, name, "+" if strand == "." else strand, line_number)
    if count == 0:
        raise InputError(f"BED file {path} holds no regions")


def fasta_cache_dir() -> Path:
    """Where FASTA indexes are written when there is no up-to-date ``.fai`` beside the FASTA.

    ``$MEMORYCORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/memorycore``, else ``~/.cache/memorycore``; the system
    temporary folder when none of them is writable.
    """
    if os.environ.get("MEMORYCORE_CACHE_DIR"):
        base = Path(os.environ["MEMORYCORE_CACHE_DIR"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memorycore"
    for candidate in (base, Path(tempfile.gettempdir()) / "memorycore-cache"):
        try:
            (candidate / "fai").mkdir(parents=True, exist_ok=True)
            if os.access(candidate / "fai", os.W_OK):
                return candidate / "fai"
        except OSError:
            continue
    raise InputError("no writable folder for the FASTA index; set MEMORYCORE_CACHE_DIR to one")


def fasta_index_path(fasta: Path) -> Path:
    """The ``.fai`` to use: the one beside the FASTA if it is newer than the FASTA, else one in the cache.

    The index is never written next to the user's file (the folder may be read-only or shared); the cache name
    includes the FASTA's path, size and modification time, so an edited FASTA gets a fresh index.
    """
    stat = fasta.stat()
    beside = fasta.with_name(fasta.name + ".fai")
    if beside.is_file() and beside.stat().st_size > 0 and beside.stat().st_mtime >= stat.st_mtime:
        return beside  # (an empty one, left by an interrupted tool, is ignored)
    key = f"{fasta.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return fasta_cache_dir() / f"{fasta.name}.{hashlib.sha256(key).hexdigest()[:16]}.fai"


@contextmanager
def open_indexed_fasta(path: str | os.PathLike):
    """Open a FASTA with pyfaidx for random access, writing its index only to :func:`fasta_index_path`."""
    import pyfaidx

    fasta_path = _existing_file(path, "FASTA file")
    if fasta_path.name.lower().endswith(".gz"):
        raise InputError(f"{fasta_path}: regions need random access, which a gzip-compressed FASTA does not give; "
                         f"decompress it first (gunzip -k {fasta_path})")
    index = fasta_index_path(fasta_path)
    if not index.exists():
        _build_index_atomically(fasta_path, index)
    try:
        fasta = pyfaidx.Fasta(str(fasta_path), indexname=str(index), sequence_always_upper=False, rebuild=False,
                              build_index=False)
    except (pyfaidx.FastaIndexingError, ValueError) as error:
        raise InputError(f"cannot index {fasta_path} as FASTA: {error}") from None
    try:
        yield fasta
    finally:
        fasta.close()


def _build_index_atomically(fasta_path: Path, index: Path) -> None:
    import pyfaidx

    fd, tmp = tempfile.mkstemp(prefix=f".{index.name}.", suffix=".tmp", dir=index.parent)
    os.close(fd)
    os.unlink(tmp)  # pyfaidx builds the index only where none exists
    try:
        pyfaidx.Faidx(str(fasta_path), indexname=tmp).close()
        os.replace(tmp, index)
    except (pyfaidx.FastaIndexingError, ValueError) as error:
        hint = ""
        if "line length" in str(error).lower():
            hint = ("; random access needs every line of a record but its last to be equally long: rewrap it, "
                    "e.g. seqkit seq -w 60")
        raise InputError(f"cannot index {fasta_path} as FASTA: {str(error).rstrip('.')}{hint}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def iter_bed_sequences(fasta: str | os.PathLike, bed: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Stream ``(region id, sequence)`` for every BED region of ``fasta``; ``-`` strand regions are
    reverse-complemented (:func:`iter_bed_regions` gives the regions themselves).
    """
    for region, sequence in iter_bed_regions(fasta, bed):
        yield region.id, sequence


def iter_bed_regions(fasta: str | os.PathLike, bed: str | os.PathLike) -> Iterator[tuple[BedRegion, str]]:
    """Stream ``(region, sequence)`` for every BED region of ``fasta``, the region with its coordinates; ``-`` strand
    regions are reverse-complemented.

    Raises
    ------
    InputError
        A region names a sequence the FASTA lacks, reaches past its end, or two regions share an id.
    """
    seen: set[str] = set()
    with open_indexed_fasta(fasta) as handle:
        lengths = {name: len(record) for name, record in handle.records.items()}
        for region in iter_bed(bed):
            check_region(region, lengths, fasta, bed)
            if region.id in seen:
                raise InputError(f"{bed}: line {region.line}: duplicate region id {region.id!r}; give regions "
                                 f"unique names (column 4)")
            seen.add(region.id)
            sequence = handle[region.chrom][region.start:region.end].seq
            yield region, reverse_complement(sequence) if region.strand == "-" else sequence


def check_region(region: BedRegion, lengths: dict[str, int], fasta: str | os.PathLike,
                 bed: str | os.PathLike) -> None:
    """Raise InputError when ``region`` names a sequence that ``lengths`` (a FASTA's) lacks, or ends past its end."""
    if region.chrom not in lengths:
        known = ", ".join(list(lengths)[:5]) + (" ..." if len(lengths) > 5 else "")
        raise InputError(f"{bed}: line {region.line} names sequence {region.chrom!r}, which is not in "
                         f"{fasta} (it has {known})")
    if region.end > lengths[region.chrom]:
        raise InputError(f"{bed}: line {region.line}: region {region.chrom}:{region.start}-{region.end} ends "
                         f"past the end of {region.chrom!r} (length {lengths[region.chrom]})")


def load_bed(fasta: str | os.PathLike, bed: str | os.PathLike,
             labels: str | os.PathLike | None = None) -> SequenceData:
    """Cut every BED region out of ``fasta`` (see :func:`iter_bed_sequences`), with optional labels by region id."""
    ids, sequences = [], []
    for region_id, sequence in iter_bed_sequences(fasta, bed):
        ids.append(region_id)
        sequences.append(sequence)
    return SequenceData(ids, sequences, attach_labels(ids, labels) if labels is not None else None)


# --------------------------------------------------------------------------------------------------- dispatch


def _refuse_fastq(path: Path) -> None:
    """FASTQ (reads with qualities) is not a table; say so rather than report its odd 'columns'."""
    with _open_text(path) as handle:
        first = next((line for line in handle if line.strip()), "")
    if first.startswith("@"):
        raise InputError(f"{path} looks like FASTQ (its first line starts with '@'); give FASTA, e.g. "
                         f"seqtk seq -a {path} > reads.fa")


def is_fasta(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like FASTA: by extension, else by a first non-blank character of ``>``."""
    path = Path(path)
    if _strip_gz(path).endswith(FASTA_SUFFIXES):
        return True
    if _strip_gz(path).endswith((".csv", ".tsv", ".tab")) or not path.is_file():
        return False
    with _open_text(path) as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith(">")
    return False


def load_sequences(
    path: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    bed: str | os.PathLike | None = None,
    split: str = "train",
    require_labels: bool = False,
) -> SequenceData:
    """Read sequences from a GenomicBenchmarks folder, a CSV/TSV table, FASTA, or FASTA + BED.

    Parameters
    ----------
    path : path-like
        A folder (GenomicBenchmarks layout), a ``.csv``/``.tsv`` table, or a FASTA file.
    labels : path-like, optional
        Two-column ``id label`` file for FASTA (and FASTA + BED) input.
    bed : path-like, optional
        BED regions to cut from the FASTA ``path``.
    split : str
        Split of a GenomicBenchmarks folder (a table or FASTA file is one split; it ignores this).
    require_labels : bool
        Raise when the data carry no labels (training, evaluation).

    Examples
    --------
    >>> train = load_sequences("human_nontata_promoters", split="train")  # doctest: +SKIP
    >>> train.labels[:2]  # doctest: +SKIP
    ['negative', 'negative']
    """
    source = Path(path)
    if not source.exists():
        raise InputError(f"input {source} does not exist; check the path")
    if source.is_dir():
        if bed is not None or labels is not None:
            raise InputError(f"{source} is a folder: --bed and --labels apply to FASTA input only")
        data = load_genomic_benchmarks(source, split=split)
    elif bed is not None:
        data = load_bed(source, bed, labels)
    elif is_fasta(source):
        data = load_fasta(source, labels)
    else:
        _refuse_fastq(source)
        if labels is not None:
            raise InputError(f"{source} is a table: its labels come from its label column, not from --labels")
        data = load_table(source, require_labels=require_labels)
    if require_labels and data.labels is None:
        raise InputError(f"{source} has no labels; give a label file (--labels) with an id and a label per record")
    return data

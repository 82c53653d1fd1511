"""Finding and reading input files: paths, globs, fsspec URLs and pkg:// package data.

Readers never modify a source file; they read its bytes once, decode them (detecting the
encoding when asked), and return a table of strings plus the row number of every record, so
that later errors can name the file and the row.
"""

from __future__ import annotations

import csv
import glob as globmod
import importlib.util
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd

from domaintune.errors import ConfigError, DataError, shown
from domaintune.fingerprint import hash_local_file, hash_obj
from domaintune.readers.squad import LAYOUT_COLUMNS as SQUAD_COLUMNS
from domaintune.readers.squad import is_squad, squad_records
from domaintune.readers.tmx import read_tmx

log = logging.getLogger(__name__)

FORMAT_BY_SUFFIX = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".conll": "conll",
    ".iob": "conll",
    ".bio": "conll",
    ".tmx": "tmx",
}
#: compressed exports (``data.csv.gz``): read through fsspec's codecs, named by the inner suffix
COMPRESSION_BY_SUFFIX = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_MAGIC = set("*?[")
ROW = "_row"
SOURCE = "_source"
#: ``read_file``'s table attribute: CSV rows skipped because every field was empty
EMPTY_ROWS = "empty_rows"
#: ``read_file``'s table attribute: columns a reader made from a file's structure (SQuAD's
#: id, title, is_impossible), which are never reported as unused
LAYOUT_COLUMNS = "layout_columns"


def row_ids(df: pd.DataFrame) -> pd.Series:
    """Each raw row's identity, (source file, row number): what validate quarantines and
    preprocess leaves out."""
    return pd.Series(
        list(zip(df[SOURCE].astype(str), df[ROW].astype(int), strict=True)), index=df.index
    )


@dataclass(frozen=True)
class SourceFile:
    """One input file: ``url`` is what users see in messages, ``fs``/``path`` read it."""

    url: str
    fs: Any
    path: str

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def fingerprint(self) -> str:
        """The file's content fingerprint: sha256 of a local file, the object store's own
        checksum, size and time for a remote one (read without downloading)."""
        if self.is_local:
            return hash_local_file(self.path)
        info = self.fs.info(self.path)  # object stores: ETag / checksum / size / mtime
        return hash_obj({k: str(v) for k, v in info.items() if k != "name"}, length=64)

    def read_bytes(self) -> bytes:
        """The file's bytes, decompressed when its name ends in a compression suffix."""
        codec = compression_of(self.path)
        try:
            with self.fs.open(self.path, "rb") as f:
                if codec is None:
                    return f.read()
                from fsspec.compression import compr  # zstd: registered by zstandard

                try:
                    with compr[codec](f, mode="rb") as inner:
                        return inner.read()
                except _codec_errors() as exc:  # a damaged or mislabelled file
                    raise DataError(
                        f"{self.url}: cannot be read as {codec}: {shown(exc)}; rule: a file named "
                        f"*{os.path.splitext(self.path)[1]} is {codec}-compressed"
                    ) from None
        except FileNotFoundError:
            raise DataError(f"{self.url}: file not found") from None
        except IsADirectoryError:
            raise DataError(f"{self.url}: is a folder, not a file") from None
        except PermissionError:
            raise DataError(f"{self.url}: permission denied") from None


def _codec_errors() -> tuple[type[BaseException], ...]:
    """What the decompressors raise for bytes that are not what the name says (lzma and
    zstandard have their own error types)."""
    import lzma

    found: list[type[BaseException]] = [OSError, EOFError, ValueError, lzma.LZMAError]
    try:
        import zstandard

        found.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return tuple(found)


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def resolve_package_path(spec: str) -> str:
    """``pkg://name/sub/path`` -> the folder of installed package ``name`` + sub/path.

    The package is located with importlib's finder and never imported (importing some data
    packages loads their whole corpus).
    """
    rest = spec[len("pkg://") :]
    name, _, sub = rest.partition("/")
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        dist = name.replace("_", "-")
        raise ConfigError(
            f"{spec}: Python package {name!r} is not installed (pip install --no-deps {dist})"
        )
    base = list(found.submodule_search_locations)[0]
    return os.path.join(base, sub) if sub else base


def resolve_sources(
    source: str | list[str],
    field: str = "data.source",
    storage_options: dict[str, Any] | None = None,
    allow_empty: bool = False,
) -> list[SourceFile]:
    """Expand every source spec into concrete files, sorted, de-duplicated.

    ``storage_options`` (data.storage_options) open remote file systems; ``${env:NAME}`` in
    them is read from the environment now. A spec that matches nothing is an error unless
    ``allow_empty`` (a landing folder with nothing new in it yet)."""
    specs = [source] if isinstance(source, str) else list(source)
    if not specs:
        raise ConfigError(f"{field}: no source given")
    files: dict[str, SourceFile] = {}
    for spec in specs:
        found = _expand(spec, storage_options)
        if not found and not allow_empty:
            raise DataError(f"{field}: {spec!r} matched no files")
        for f in found:
            files.setdefault(f.url, f)
    return [files[k] for k in sorted(files)]


def _expand(spec: str, storage_options: dict[str, Any] | None = None) -> list[SourceFile]:
    if spec.startswith("pkg://"):
        spec = resolve_package_path(spec)
    if "://" in spec and not spec.startswith("file://"):
        from domaintune.credentials import resolve_env_refs

        options = resolve_env_refs(storage_options, "data.storage_options")
        fs, path = fsspec.core.url_to_fs(spec, **options)
        proto = _protocols(fs)[0]
        if any(c in path for c in _MAGIC):
            paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if _known_suffix(p))
        elif fs.exists(path):
            paths = [path]
        else:
            paths = []
        return [
            SourceFile(url=f"{proto}://{p}" if "://" not in p else p, fs=fs, path=p)
            for p in paths
            if not fs.isdir(p)
        ]
    path = os.path.expanduser(spec[len("file://") :] if spec.startswith("file://") else spec)
    fs = fsspec.filesystem("file")
    if any(c in path for c in _MAGIC):
        paths = sorted(p for p in globmod.glob(path, recursive=True) if os.path.isfile(p))
        _refuse_escaping_links(paths, _glob_base(path))
    elif os.path.isdir(path):
        paths = sorted(
            os.path.join(d, n)
            for d, _, names in os.walk(path)
            for n in names
            if _known_suffix(n) and not n.startswith(".")
        )
        _refuse_escaping_links(paths, path)
    elif os.path.exists(path):
        paths = [path]
    else:
        paths = []
    return [SourceFile(url=os.path.abspath(p), fs=fs, path=os.path.abspath(p)) for p in paths]


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts:
        if any(c in part for c in _MAGIC):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def _refuse_escaping_links(paths: list[str], base: str) -> None:
    """A file matched inside a folder (a landing zone) must not be a link to data outside it:
    whoever can drop a symlink there could make a run read any file the worker can."""
    root = os.path.realpath(base)
    for p in paths:
        real = os.path.realpath(p)
        if os.path.commonpath([real, root]) != root:
            raise DataError(
                f"{p}: links to {real}, outside {root}; rule: inputs matched in a folder stay "
                "inside it (no symbolic links or '..' out of it)"
            )


def compression_of(name: str) -> str | None:
    """The codec a file name declares (``.gz``, ``.bz2``, ``.xz``, ``.zst``), or None."""
    return COMPRESSION_BY_SUFFIX.get(os.path.splitext(name)[1].lower())


def data_suffix(name: str) -> str:
    """The suffix that names a file's format, under any compression suffix (``.csv`` of
    ``export.csv.gz``)."""
    if compression_of(name):
        name = os.path.splitext(name)[0]
    return os.path.splitext(name)[1].lower()


def _known_suffix(name: str) -> bool:
    return data_suffix(name) in FORMAT_BY_SUFFIX


def infer_format(files: list[SourceFile], declared: str | None) -> str:
    if declared:
        return declared
    formats = {FORMAT_BY_SUFFIX.get(data_suffix(f.path)) for f in files}
    if None in formats:
        odd = next(f.url for f in files if not _known_suffix(f.path))
        raise ConfigError(
            f"data.format: cannot infer the format of {odd}; set data.format to one of "
            "csv, jsonl, parquet, text, conll, tmx"
        )
    if len(formats) > 1:
        raise ConfigError(
            f"data.format: the sources mix formats ({', '.join(sorted(formats))}); "
            "use one format per run or set data.format"
        )
    return formats.pop()


# ----------------------------------------------------------------------------- decoding

_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


#: File signatures of formats that are not text, by the name a user would recognise.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or an Excel .xlsx workbook)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"PAR1", "a Parquet file (set data.format: parquet)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Excel / Office document"),
    (b"\x7fELF", "an executable"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
# a valid multi-byte UTF-8 sequence (what "é" or "–" look like when a file mixes encodings)
_UTF8_MULTIBYTE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
)


def check_not_binary(data: bytes, where: str, fmt: str) -> None:
    """A binary file given as text (a spreadsheet renamed .csv, an archive) fails here, by
    its kind, instead of as a confusing parse error further on."""
    for magic, kind in _SIGNATURES:
        if data.startswith(magic):
            raise DataError(
                f"{where}: this is {kind}, not {fmt} text; rule: data.format {fmt} files "
                "are text (export the data as CSV, JSONL or Parquet)"
            )


def decode(data: bytes, encoding: str, where: str) -> tuple[str, str]:
    """Decode bytes to text; ``auto`` detects. Returns (text, encoding used)."""
    declared = encoding.lower().replace("_", "-")
    if declared != "auto" and declared not in ("utf-8", "utf8", "utf-8-sig"):
        for bom, enc in _BOMS:
            if data.startswith(bom) and not declared.startswith(enc.split("-sig")[0][:6]):
                raise DataError(
                    f"{where}: starts with a {enc.replace('-sig', '').upper()} byte-order mark but "
                    f"data.encoding is {encoding!r}; set data.encoding: {enc.replace('-sig', '')} "
                    "(or auto)"
                )
    if encoding.lower() != "auto":
        enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
        try:
            return data.decode(enc), encoding
        except LookupError:
            raise ConfigError(f"data.encoding: unknown encoding {encoding!r}") from None
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{where}: line {line}: bytes {data[exc.start : exc.start + 4]!r} are not valid "
                f"{encoding} (data.encoding); set data.encoding: auto to detect the encoding"
            ) from None
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(enc), enc
            except UnicodeDecodeError:
                break
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as exc:
        first_bad = exc.start
    _refuse_mixed_encodings(data, first_bad, where)
    if data.count(b"\x00") > len(data) // 8:
        raise DataError(
            f"{where}: looks binary (NUL bytes), not text; rule: inputs are text files "
            "(or set data.format: parquet for Parquet files)"
        )
    from charset_normalizer import from_bytes

    # Only guesses in which a language was recognised count (a short file with one pound sign
    # otherwise comes out as Japanese cp932). cp1252, the most common legacy encoding of
    # Western text, wins whenever it reads the bytes about as cleanly as the best guess
    # (cp1250 and friends often tie with it and turn "£" into "Ł").
    matches = sorted(
        (m for m in from_bytes(data[:1_000_000]) if m.coherence > 0),
        key=lambda m: (m.chaos, -m.coherence),
    )
    candidates = []
    if matches:
        best = matches[0]
        western = [m for m in matches if m.encoding == "cp1252" and m.chaos <= best.chaos + 0.02]
        candidates.append("cp1252" if western else best.encoding)
    candidates += ["cp1252", "latin-1"]
    for enc in dict.fromkeys(candidates):
        try:
            text = data.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
        log.info("%s: not UTF-8; decoded as %s", where, enc)
        return text, enc
    raise DataError(
        f"{where}: cannot detect the text encoding; set data.encoding"
    )  # pragma: no cover


def _refuse_mixed_encodings(data: bytes, first_bad: int, where: str) -> None:
    """Part UTF-8, part something else (two exports concatenated): any single guess turns
    one of the parts into mojibake silently, so refuse, naming a line of each."""
    utf8 = [m for m in _UTF8_MULTIBYTE.finditer(data) if not m.group().startswith(b"\xc2\xa0")]
    if len(utf8) < 2:
        return  # one chance pair in a legacy file is no evidence of UTF-8
    good_line = data[: utf8[0].start()].count(b"\n") + 1
    bad_line = data[:first_bad].count(b"\n") + 1
    raise DataError(
        f"{where}: mixed encodings: line {good_line} is UTF-8 but line {bad_line} is not "
        f"(bytes {data[first_bad : first_bad + 4]!r}); rule: one encoding per file (re-export "
        "it, or set data.encoding to read every line one way)"
    )


# ------------------------------------------------------------------------------ readers


def read_file(
    src: SourceFile,
    fmt: str,
    encoding: str,
    delimiter: str | None,
    unparsed: list[dict[str, Any]] | None = None,
) -> tuple[pd.DataFrame, str | None]:
    """Read one file into a table with ``_row`` (1-based record number) and ``_source``.

    With ``unparsed`` (data.on_invalid: quarantine) a JSONL line or CoNLL sentence that does
    not parse is appended there (``_row``, ``_record``: its text, ``_reasons``) instead of
    failing the file. A file with nothing readable, and CSV / Parquet damage (which shifts
    every later row), still fail. CSV rows whose every field is empty (a spreadsheet export
    padded with ``,,,`` lines) are skipped; ``df.attrs[EMPTY_ROWS]`` counts them, and the
    other rows keep their record numbers. ``_row`` and ``_source`` are the reader's own: a
    file's columns of those names (a predictions file read back) are replaced."""
    data = src.read_bytes()
    empty = 0
    if fmt == "parquet":
        df, enc = _read_parquet(data, src.url), None
        df[ROW] = range(1, len(df) + 1)  # the reader's own, even where the file has a _row
    elif fmt == "tmx":  # XML: its own declaration names the encoding
        check_not_binary(data[:64], src.url, fmt)
        declared = None if encoding.lower() == "auto" else encoding
        df, enc = read_tmx(data, src.url, declared), None
    else:
        if not data.strip():
            raise DataError(f"{src.url}: file is empty")
        check_not_binary(data[:64], src.url, fmt)
        text, enc = decode(data, encoding, src.url)
        if "\x00" in text:
            line = text[: text.index("\x00")].count("\n") + 1
            raise DataError(
                f"{src.url}: line {line}: NUL byte in text; rule: inputs are clean text"
            )
        if fmt == "csv":
            df, empty = _read_csv(text, src.url, delimiter or _sniff_delimiter(text, src.path))
        elif fmt == "jsonl":
            df = _read_jsonl(text, src.url, unparsed, data_suffix(src.path) == ".json")
        elif fmt == "conll":
            df = _read_conll(text, src.url, unparsed)
        elif fmt == "text":
            df = pd.DataFrame(
                {
                    "text": [text],
                    "directory": [os.path.basename(os.path.dirname(src.path))],
                    "filename": [os.path.basename(src.path)],
                }
            )
        else:  # pragma: no cover - the config model forbids other formats
            raise ConfigError(f"data.format: unsupported format {fmt!r}")
    df = df.reset_index(drop=True)
    if ROW not in df.columns:
        df[ROW] = range(1, len(df) + 1)
    df[SOURCE] = src.url
    df.attrs[EMPTY_ROWS] = empty
    return df, enc


def _sniff_delimiter(text: str, path: str) -> str:
    if data_suffix(path) == ".tsv":
        return "\t"
    sample = text[:20000]
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _read_csv(text: str, where: str, delimiter: str) -> tuple[pd.DataFrame, int]:
    try:
        df = pd.read_csv(
            io.StringIO(text),
            sep=delimiter,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            on_bad_lines="error",
            skip_blank_lines=True,
        )
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{where}: no header and no rows; rule: a CSV starts with a header row"
        ) from None
    except pd.errors.ParserError as exc:
        msg = str(exc).strip().replace("Error tokenizing data. C error: ", "")
        raise DataError(
            f"{where}: malformed CSV: {msg}; rule: every row has the header's fields "
            f"(delimiter {delimiter!r}, quotes balanced)"
        ) from None
    if df.empty:
        raise DataError(f"{where}: header only, no data rows")
    unnamed = [c for c in df.columns if str(c).startswith("Unnamed: ")]
    if unnamed and len(unnamed) == len(df.columns):
        raise DataError(f"{where}: header row is empty")
    df[ROW] = range(1, len(df) + 1)  # the reader's own, even where the file has a _row
    empty = df.drop(columns=ROW).isna().all(axis=1)
    if empty.all():
        raise DataError(f"{where}: no data rows ({len(df)} row(s) with every field empty)")
    return df[~empty], int(empty.sum())


def _unparsed(unparsed: list[dict[str, Any]] | None, line: int, record: str, reason: str) -> None:
    """Hold a record that did not parse (quarantine), or fail with ``reason``."""
    if unparsed is None:
        raise DataError(reason)
    unparsed.append({ROW: line, "_record": record, "_reasons": f"parse: {reason}"})


def _held_detail(unparsed: list[dict[str, Any]] | None, since: int, what: str) -> str:
    """' (3 line(s) did not parse; first: ...)' for a file where nothing parsed."""
    held = unparsed[since:] if unparsed is not None else []
    if not held:
        return ""
    first = held[0]["_reasons"].removeprefix("parse: ")
    return f" ({len(held)} {what}(s) did not parse; first: {first})"


#: The deepest nesting of arrays and objects a JSON input may have. Records nest a few levels
#: (SQuAD: 6, chat messages: 3); Python's parser, and every step after it that walks a value
#: (copies, fingerprints, Parquet), recurses once per level, so that ``[[[[...]]]]`` 5,000
#: levels deep ended in a RecursionError traceback. Deeper input is refused by this rule.
MAX_JSON_DEPTH = 100
_JSON_DEPTH_RULE = f"JSON input nests at most {MAX_JSON_DEPTH} levels of arrays and objects"
# a JSON string on one line (JSON strings hold no raw line break), and a bracket outside one
_JSON_STRING = re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def load_json(text: str, where: str = "<json>", first_line: int = 1) -> Any:
    """``json.loads(text)``: the one place input JSON is parsed. Nesting deeper than
    MAX_JSON_DEPTH is a one-line DataError naming ``where``, the line (``first_line``: the line
    of the file ``text`` starts on) and the rule; invalid JSON raises ``json.JSONDecodeError``
    as ``json.loads`` does."""
    try:
        value = json.loads(text)
    except RecursionError:  # thousands of levels: the parser gave up (cleanly) on its own
        pass
    else:
        if text.count("[") + text.count("{") <= MAX_JSON_DEPTH or not _deeper(value):
            return value  # (it cannot nest deeper than it has brackets: almost every record)
    line = _too_deep_line(text)
    at = "" if line is None else f" line {first_line + line}:"
    raise DataError(
        f"{where}:{at} nested deeper than {MAX_JSON_DEPTH} levels; rule: {_JSON_DEPTH_RULE}"
    )


def _deeper(value: Any) -> bool:
    """Whether a parsed JSON value nests deeper than MAX_JSON_DEPTH (walked without
    recursion, stopping at the first container too deep)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _too_deep_line(text: str) -> int | None:
    """The 0-based line on which ``text`` first nests deeper than MAX_JSON_DEPTH, or None. It
    reads strings as JSON does (up to the first error JSON would raise)."""
    code = _JSON_STRING.sub('""', text)  # keeps every line break: strings hold none
    depth = 0
    for m in _JSON_BRACKET.finditer(code):
        depth += 1 if m[0] in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            return code.count("\n", 0, m.start())
    return None


def _read_jsonl(
    text: str, where: str, unparsed: list[dict[str, Any]] | None = None, json_file: bool = False
) -> pd.DataFrame:
    """JSON Lines, a JSON array of objects, or (``json_file``: a ``.json`` file) one JSON
    document: SQuAD (one record per question) or a single record."""
    held_before = len(unparsed) if unparsed is not None else 0
    stripped = text.lstrip()
    records: list[dict] = []
    lines: list[int] = []
    layout: tuple[str, ...] = ()
    document = _one_document(text, where) if json_file and stripped.startswith("{") else None
    if document is not None:
        first_line = text[: len(text) - len(stripped)].count("\n") + 1
        records, lines, layout = _document_records(document, where, unparsed, first_line)
    elif stripped.startswith("["):  # a .json array of objects
        first_line = text[: len(text) - len(stripped)].count("\n") + 1
        try:
            arr = load_json(stripped, where, first_line)
        except json.JSONDecodeError as exc:
            line = exc.lineno + first_line - 1
            raise DataError(f"{where}: line {line}: not valid JSON ({exc.msg})") from None
        for i, obj in enumerate(arr, 1):
            if not isinstance(obj, dict):
                raise DataError(
                    f"{where}: item {i}: expected a JSON object, got {type(obj).__name__}"
                )
        records = arr
        lines = list(range(1, len(arr) + 1))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = load_json(line, where, n)
            except DataError as exc:  # nested too deep
                _unparsed(unparsed, n, line, str(exc))
                continue
            except json.JSONDecodeError as exc:
                msg = (
                    f"{where}: line {n}: not valid JSON ({exc.msg}); rule: one JSON object per line"
                )
                _unparsed(unparsed, n, line, msg)
                continue
            if not isinstance(obj, dict):
                msg = f"{where}: line {n}: expected a JSON object, got {type(obj).__name__}"
                _unparsed(unparsed, n, line, msg)
                continue
            records.append(obj)
            lines.append(n)
    if not records:
        what = "question" if layout else "line"
        raise DataError(f"{where}: no records{_held_detail(unparsed, held_before, what)}")
    df = pd.DataFrame.from_records(records)
    df[ROW] = lines  # JSONL rows are named by their line number (SQuAD: question number)
    if layout:
        df.attrs[LAYOUT_COLUMNS] = layout
    return df


_JSON_RULE = (
    "a .json file holds JSON Lines (one object per line), an array of objects, one object "
    '(one record) or SQuAD\'s {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}'
)


def _one_document(text: str, where: str) -> Any | None:
    """The one JSON document a ``.json`` file holds (pretty-printed or not), or None where
    the file is JSON Lines. A broken document fails here, naming its line and column."""
    try:
        return load_json(text, where)
    except DataError:  # nested too deep
        if _next_line_is_an_object(text):
            return None  # JSON Lines: the line that nests too deep is one record
        raise
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" or _next_line_is_an_object(text):
            return None  # JSON Lines: its first record is complete, or broken on its own
        truncated = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        hint = " (the text ends inside a value: truncated?)" if truncated else ""
        raise DataError(
            f"{where}: line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})"
            f"{hint}; rule: {_JSON_RULE}"
        ) from None


def _next_line_is_an_object(text: str) -> bool:
    """Whether the second non-blank line is a JSON object on its own (JSON Lines)."""
    rest = [line for line in text.lstrip().splitlines()[1:] if line.strip()]
    try:
        return bool(rest) and isinstance(load_json(rest[0]), dict)
    except (ValueError, DataError):  # not JSON, or nested too deep
        return False


def _document_records(
    doc: Any, where: str, unparsed: list[dict[str, Any]] | None, first_line: int
) -> tuple[list[dict], list[int], tuple[str, ...]]:
    """(records, their row numbers, the layout's own columns) of a one-document file."""
    if is_squad(doc):
        records, rows = squad_records(
            doc, where, lambda row, record, reason: _unparsed(unparsed, row, record, reason)
        )
        return records, rows, SQUAD_COLUMNS
    key = _records_key(doc)
    if key is not None:
        raise DataError(
            f"{where}: a JSON object holding a list of objects under {key!r}: neither SQuAD "
            f"(its items have no 'paragraphs') nor one record; rule: {_JSON_RULE}"
        )
    return [doc], [first_line], ()


def _records_key(doc: dict) -> str | None:
    """The key of a list of objects that makes ``doc`` a container of records, not a record
    (a conversation's turns, objects with role or from, belong to a record)."""
    for key, value in doc.items():
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, dict) for v in value)
            and not any({"role", "from"} & set(v) for v in value)
        ):
            return str(key)
    return None


def _read_conll(
    text: str, where: str, unparsed: list[dict[str, Any]] | None = None
) -> pd.DataFrame:
    """CoNLL: ``token ... TAG`` per line (first and last whitespace-separated fields), a blank
    line between sentences, ``-DOCSTART-`` lines ignored. ``_row`` is the line number of each
    sentence's first token."""
    held_before = len(unparsed) if unparsed is not None else 0
    sentences: list[tuple[list[str], list[str], int]] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[str] = []
    start = 0
    broken = ""  # why the sentence being read cannot be used (quarantine)

    def end_sentence() -> None:
        if broken:
            _unparsed(unparsed, start, "\n".join(lines), broken)
        elif tokens:
            sentences.append((tokens, tags, start))

    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            end_sentence()
            tokens, tags, lines, broken = [], [], [], ""
            continue
        if not lines:
            start = n
        lines.append(line)
        if len(fields) < 2:
            broken = broken or (
                f"{where}: line {n}: expected 'token TAG', got {line.strip()!r}; rule: every "
                "token line has a tag (CoNLL format)"
            )
            if unparsed is None:
                raise DataError(broken)
            continue
        tokens.append(fields[0])
        tags.append(fields[-1])
    end_sentence()
    if not sentences:
        raise DataError(
            f"{where}: no sentences (CoNLL: 'token TAG' lines, blank line between sentences)"
            + _held_detail(unparsed, held_before, "sentence")
        )
    return pd.DataFrame(
        {
            "tokens": [s[0] for s in sentences],
            "tags": [s[1] for s in sentences],
            ROW: [s[2] for s in sentences],
        }
    )


def _read_parquet(data: bytes, where: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(io.BytesIO(data)).names
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is None:
            df = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        said = shown(" ".join(str(exc).split()), 300)  # its messages span lines
        raise DataError(
            f"{where}: not a readable Parquet file ({type(exc).__name__}: {said})"
        ) from None
    if twice is not None:
        raise DataError(
            f"{where}: column {shown(twice, quote=True)} appears {names.count(twice)} times; "
            "rule: a table's column names are unique"
        )
    if df.empty:
        raise DataError(f"{where}: no rows")
    return df

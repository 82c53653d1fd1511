"""Content fingerprints: the basis of every cache key.

Keys hash *content*, not names: a tokenizer is fingerprinted by its files' bytes, a data file
by its bytes, a table by its rows. Hashes of local files are memoised by (path, size, mtime)
so that checking a cache does not re-read gigabytes of weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

_FILE_HASH_MEMO: dict[tuple[str, int, int], str] = {}
_CHUNK = 4 * 1024 * 1024


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of libraries whose behaviour changes a stage's output."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def stable_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal objects give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"cannot fingerprint object of type {type(obj).__name__}")


def hash_obj(*parts: Any, length: int = 20) -> str:
    """Hash any JSON-able parts into a short hex key."""
    h = hashlib.sha256()
    for part in parts:
        h.update(stable_json(part).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:length]


def hash_local_file(path: str | os.PathLike) -> str:
    """sha256 of a local file's bytes, memoised by (path, size, mtime)."""
    p = os.fspath(path)
    st = os.stat(p)
    memo_key = (os.path.realpath(p), st.st_size, st.st_mtime_ns)
    cached = _FILE_HASH_MEMO.get(memo_key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _FILE_HASH_MEMO[memo_key] = digest
    return digest


def hash_local_files(root: str | os.PathLike, names: list[str] | None = None) -> str:
    """Fingerprint a set of files under ``root`` by their relative names and bytes.

    With ``names`` only those files count (missing ones are skipped); otherwise every file
    under root, recursively, in sorted order.
    """
    root = Path(root)
    if names is None:
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        files = [root / n for n in sorted(names) if (root / n).is_file()]
    entries = [(str(p.relative_to(root)), hash_local_file(p)) for p in files]
    return hash_obj(entries, length=32)


def hash_dataframe(df: pd.DataFrame) -> str:
    """Fingerprint a table by its column names, dtypes and row contents (order-sensitive)."""
    h = hashlib.sha256()
    h.update(stable_json([[str(c), str(t)] for c, t in df.dtypes.items()]).encode())
    if len(df):
        row_hashes = pd.util.hash_pandas_object(
            df.map(_hashable) if _has_unhashable(df) else df, index=False
        )
        h.update(row_hashes.to_numpy().tobytes())
    return h.hexdigest()[:32]


def _has_unhashable(df: pd.DataFrame) -> bool:
    for col in df.columns:
        if df[col].dtype == object and len(df) and isinstance(df[col].iloc[0], list | dict):
            return True
    return False


def _hashable(value: Any) -> Any:
    if isinstance(value, list | dict):
        return stable_json(value)
    return value

"""The search folder ``<storage.root>/tune/<search_id>/``: ids, ``search.json``, ``trials.json``."""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_json
from workflows.tune.errors import TuneError

__all__ = [
    "BEST_FILE",
    "EXPERIMENT_DIR",
    "SEARCH_FILE",
    "TRIALS_FILE",
    "best_config_path",
    "check_search_id",
    "load_search",
    "new_search_id",
    "plain",
    "read_json",
    "search_dir",
    "update_search",
    "write_json",
]

EXPERIMENT_DIR = "experiment"
SEARCH_FILE = "search.json"
TRIALS_FILE = "trials.json"
BEST_FILE = "best.yaml"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_search_id() -> str:
    """A fresh, sortable search id: ``YYYYmmdd-HHMMSS-xxxx``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def check_search_id(search_id: str) -> None:
    """A one-line :class:`TuneError` unless ``search_id`` is a well-formed id."""
    if not _ID.match(search_id or ""):
        raise TuneError(f"tune: {search_id!r} is not a search id (letters, digits, . _ -)")


def search_dir(storage_root: str, search_id: str) -> Path:
    """``<storage_root>/tune/<search_id>``; a malformed id or a URI root is a one-line error."""
    check_search_id(search_id)
    if "://" in str(storage_root):
        raise TuneError(f"tune: storage.root must be a local or shared path (got {storage_root})")
    return Path(storage_root).expanduser().resolve() / "tune" / search_id


def read_json(path: Path) -> Any:
    """The JSON in ``path``; None when there is no file, a one-line error when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise TuneError(f"tune: {path} is not valid JSON ({err.msg})") from None


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    return str(v)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (numpy scalars as numbers)."""
    atomic_write_json(path, obj, default=_json_default)


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON types (what it reads back as from a JSON file)."""
    return json.loads(json.dumps(obj, default=_json_default))


def load_search(storage_root: str, search_id: str) -> tuple[Path, dict[str, Any]]:
    """The search's folder and its ``search.json``; a one-line error when there is none."""
    d = search_dir(storage_root, search_id)
    info = read_json(d / SEARCH_FILE)
    if not isinstance(info, dict):
        raise TuneError(f"tune: no search {search_id} under {Path(storage_root) / 'tune'}")
    return d, info


def update_search(d: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``search.json`` (stamped ``updated``); returns the new content."""
    info = read_json(d / SEARCH_FILE) or {}
    info.update(fields)
    info["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(d / SEARCH_FILE, info)
    return info


def best_config_path(storage_root: str, search_id: str) -> str:
    """The path of the search's ``best.yaml``; a one-line :class:`TuneError` if it has none."""
    d, info = load_search(storage_root, search_id)
    path = d / BEST_FILE
    if not path.is_file():
        raise TuneError(
            f"tune: search {search_id} has no best.yaml yet (state {info.get('state', '?')}); "
            f"see contrastive tune --show {search_id}"
        )
    return str(path)

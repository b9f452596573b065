"""A batch file's lines (``gpu-tasks batch``): JSON Lines, or CSV with an ``entity_id``
column, each line a request or the reason it is not one, numbered as in the file."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gpu_tasks.errors import RoutingError


def read_lines(path: Path, file_format: str) -> Iterator[tuple[int, Any]]:
    """``(line number, request or the exception explaining why there is none)`` for every
    non-blank line; CSV lines are numbered as in the file (the header is line 1)."""
    with path.open("r", encoding="utf-8", newline="" if file_format == "csv" else None,
                   errors="strict") as f:
        if file_format == "csv":
            yield from _csv_lines(f)
            return
        number = 0
        while True:
            number += 1
            try:
                text = f.readline()
            except UnicodeDecodeError as exc:
                yield number, RoutingError(f"not UTF-8: {exc.reason}")
                return
            if not text:
                return
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, RoutingError(f"not JSON: {exc.msg} at column {exc.colno}")


def _csv_lines(f: IO[str]) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(f)
    try:
        header = next(reader)
    except StopIteration:
        return
    except (csv.Error, UnicodeDecodeError) as exc:
        yield 1, RoutingError(f"cannot read the CSV header: {exc}")
        return
    if "entity_id" not in header:
        yield 1, RoutingError(f"the CSV header has no entity_id column (it has: "
                              f"{', '.join(header)})")
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            yield reader.line_num, RoutingError(f"not CSV: {exc}")
            return
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield reader.line_num, RoutingError(
                f"{len(row)} fields where the header has {len(header)}")
            continue
        request: dict[str, Any] = {}
        kwargs: dict[str, Any] = {}
        for name, cell in zip(header, row, strict=True):
            if name in ("entity_id", "task"):
                if cell:
                    request[name] = cell
            elif name == "kwargs":
                try:
                    request["kwargs"] = json.loads(cell) if cell else {}
                except json.JSONDecodeError as exc:
                    request = {"_error": f"kwargs column is not JSON: {exc.msg}"}
                    break
            else:
                kwargs[name] = _cell(cell)
        if "_error" in request:
            yield reader.line_num, RoutingError(request["_error"])
            continue
        if kwargs:
            if not isinstance(request.get("kwargs", {}), dict):
                yield reader.line_num, RoutingError("kwargs column is not a JSON object")
                continue
            request["kwargs"] = {**request.get("kwargs", {}), **kwargs}
        yield reader.line_num, request


def _cell(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text

"""Files of `streamsink batch`: the input is checked whole before anything starts, the output is
append-only JSONL that a rerun resumes from. Plain Python (no Ray, no vLLM): fast to test."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from streamsink.errors import UsageError


class BatchInputError(UsageError):
    """Bad input or output file: one line for the user, exit 2, nothing started or written."""


@dataclass
class Record:
    line: int                      # 1-based line number in the input file
    id: Any                        # the record's id as given (a JSON string or integer)
    prompt: str | None = None
    messages: list | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool | None = None

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(value: Any) -> str:
    """Ids compare as their JSON text: 1 and "1" are different records, as they are in the file."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# Optional per-record fields and the JSON types they must have (values themselves, e.g. a
# negative temperature, are vLLM's to judge: such a record gets {"id", "error"}, the batch goes on).
_OPTIONAL = {"max_tokens": (int,), "temperature": (int, float), "top_p": (int, float),
             "seed": (int,), "ignore_eos": (bool,)}


def read_input(path: str) -> list[Record]:
    """Every record of IN.jsonl, or BatchInputError naming the first bad line."""
    if not os.path.isfile(path):
        raise BatchInputError(f"input file {path} not found")
    records: list[Record] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline, spacing) carry no record
            where = f"{path} line {number}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BatchInputError(f"{where}: not valid JSON ({_json_error(exc)})") from None
            record = _record(obj, number, where)
            if record.key in first_line:
                raise BatchInputError(f"{where}: duplicate id {record.key} "
                                      f"(first on line {first_line[record.key]})")
            first_line[record.key] = number
            records.append(record)
    return records


def _record(obj: Any, number: int, where: str) -> Record:
    if not isinstance(obj, dict):
        raise BatchInputError(f"{where}: a record must be a JSON object")
    if "id" not in obj:
        raise BatchInputError(f"{where}: record has no \"id\"")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise BatchInputError(f"{where}: \"id\" must be a string or an integer")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if not has_prompt and not has_messages:
        raise BatchInputError(f"{where}: record has no \"prompt\" or \"messages\"")
    if has_prompt and has_messages:
        raise BatchInputError(f"{where}: record has both \"prompt\" and \"messages\"")
    record = Record(line=number, id=rid)
    if has_prompt:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise BatchInputError(f"{where}: \"prompt\" must be a non-empty string")
        record.prompt = obj["prompt"]
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise BatchInputError(f"{where}: \"messages\" must be a non-empty list of "
                                  "{\"role\": str, \"content\": str}")
        record.messages = messages
    for name, types in _OPTIONAL.items():
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, bool) != (types == (bool,)) or not isinstance(value, types):
            kind = {(int,): "an integer", (bool,): "true or false"}.get(types, "a number")
            raise BatchInputError(f"{where}: \"{name}\" must be {kind}")
        setattr(record, name, value)
    return record


def _json_error(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return "not UTF-8"


@dataclass
class OutputState:
    done: set[str]        # id keys already in OUT (results and errors alike)
    good_bytes: int       # length of OUT up to its last complete line
    torn: bool            # OUT ends in a partial line (a write cut short by a kill)


def scan_output(path: str) -> OutputState:
    """What a previous run left in OUT.jsonl. Lines are written whole and flushed one at a time,
    so a kill can only leave a partial *last* line (no newline yet): it is dropped and redone.
    A complete line that is not a record means OUT is not ours: refused, OUT untouched."""
    if not os.path.exists(path):
        return OutputState(set(), 0, False)
    if not os.path.isfile(path):
        raise BatchInputError(f"output {path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    done: set[str] = set()
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BatchInputError(f"output {path} line {number}: not valid JSON "
                                  f"({_json_error(exc)}); not a streamsink batch output?") from None
        if not isinstance(obj, dict) or "id" not in obj:
            raise BatchInputError(f"output {path} line {number}: not a record with an \"id\"")
        done.add(id_key(obj["id"]))
    return OutputState(done, end, end < len(data))


class OutputWriter:
    """Appends one whole line per record and flushes it, so what is in OUT is done for good.
    Holds an exclusive lock on OUT: two runs appending to one file would duplicate ids."""

    def __init__(self, path: str, state: OutputState):
        import fcntl

        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise BatchInputError(f"output {path} is being written by another "
                                  "streamsink batch") from None
        if state.torn:
            # Drop the partial line a killed run left; its record is redone.
            os.ftruncate(self._fd, state.good_bytes)

    def write(self, obj: dict) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
        while data:  # one write(2) in practice; loop for the rare partial write
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        os.close(self._fd)

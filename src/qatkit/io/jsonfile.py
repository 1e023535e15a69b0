"""Reading small JSON files (packed LM config, KD cache manifest, run reports, progress) with one-line errors.

Anything but a regular UTF-8 file holding one JSON object of sane size and depth raises the caller's error
class (a ValueError subclass the CLI prints as one line) naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 << 20


def read_json_object(path: str | Path, error: type[ValueError], what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` it should be, for messages); ``error`` for anything else."""
    path = Path(path)
    if not path.is_file():  # a FIFO would block the reader, a folder cannot be read: neither is opened
        raise error(f"{path}: {'missing' if not path.exists() else 'not a regular file'} (expected {what})")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise error(f"{path}: {path.stat().st_size} bytes, more than {MAX_JSON_BYTES} for {what}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected {what}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # e.g. an integer literal longer than Python converts
        raise error(f"{path}: malformed JSON ({str(e).splitlines()[0][:200]})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be {what}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected {what} (a JSON object), got a JSON {type(data).__name__}")
    return data

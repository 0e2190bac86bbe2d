"""TOML spelling of config values, shared by messages, ``mt run --help`` and the resolved run file,
so a value reads the same everywhere and can be pasted back into a run file."""

from __future__ import annotations

import json
import re
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def toml_value(value: Any) -> str:
    """TOML text of a value: scalars, arrays and inline tables (what a run file holds)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # repr is the shortest text that reads back to the same float; TOML spells the same
        # inf and nan, and needs a '.' or exponent to see a float
        text = repr(value)
        return text if any(c in text for c in ".enai") else text + ".0"
    if isinstance(value, str):
        # JSON's string escapes are TOML's too; TOML also wants DEL escaped, which JSON keeps raw
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"{value!r} ({type(value).__name__}) has no TOML form")

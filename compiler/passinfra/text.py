"""Pipeline strings: ``importance.magnitude,prune.width{ratio=0.5}`` into (name, options) steps.

Items are split on commas outside braces and brackets; option values are YAML scalars or flow
lists/mappings. Empty items and an option given twice are errors that quote the step.
"""

from __future__ import annotations

from typing import Any

import yaml
from potstill.errors import InputError


def _split_top(text: str, sep: str, what: str) -> list[str]:
    """Split on ``sep`` outside braces and brackets; an empty item is an error naming ``what``."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise InputError(f"pipeline '{text}': unbalanced '{ch}'")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise InputError(f"pipeline '{text}': unbalanced braces")
    parts.append("".join(cur))
    parts = [p.strip() for p in parts]
    if parts == [""]:
        return []
    if "" in parts:
        raise InputError(f"{what} '{text}': empty item (a stray '{sep}'); remove it")
    return parts


def parse_pipeline(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``a{k=v},b`` into ``[("a", {"k": v}), ("b", {})]``; values are YAML scalars/lists.

    Empty items (``a,,b``) and an option given twice (``a{k=1,k=2}``) are errors.
    """
    steps = []
    for item in _split_top(text, ",", "pipeline"):
        if "{" in item:
            if not item.endswith("}"):
                raise InputError(f"pipeline step '{item}': options must end with '}}'")
            name, body = item.split("{", 1)
            body = body[:-1]
        else:
            name, body = item, ""
        if not name.strip():
            raise InputError(f"pipeline step '{item}': no pass name before the options")
        opts: dict[str, Any] = {}
        for kv in _split_top(body, ",", f"options of '{name.strip()}'"):
            if "=" not in kv:
                raise InputError(f"pipeline step '{item}': option '{kv}' is not key=value")
            k, v = (part.strip() for part in kv.split("=", 1))
            if k in opts:
                raise InputError(f"pipeline step '{item}': option '{k}' is given twice; keep one")
            try:
                opts[k] = yaml.safe_load(v)
            except yaml.YAMLError as e:
                raise InputError(f"pipeline step '{item}': cannot read value '{v}'") from e
        steps.append((name.strip(), opts))
    return steps

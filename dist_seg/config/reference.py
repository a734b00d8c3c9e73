"""The config reference (every key, its default and its docstring) as the markdown table the README holds.

python -m dist_seg.config.reference   # prints it; tests/config/test_config.py checks that the README is up to date
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

from dist_seg.config import schema as config
from dist_seg.config.schema import Config


def field_docs(cls: type) -> dict[str, str]:
    """field name -> its docstring (the string literal under it in the class body), whitespace collapsed."""
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:] + [None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def reference_markdown() -> str:
    """The config reference (every key, default and docstring) as a markdown table, for the README."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in dataclasses.fields(Config):
        cls = section.type if isinstance(section.type, type) else vars(config)[section.type]
        docs = field_docs(cls)
        defaults = getattr(Config(), section.name)
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            shown = "[]" if value == [] else ("null" if value is None else value)
            doc = docs.get(f.name, "").replace("|", "/")
            rows.append(f"| `{section.name}.{f.name}` | `{shown}` | {doc} |")
    rows.append("")
    rows.append(
        "`optim.groups` entries: `params` (fnmatch pattern on parameter names), `lr_mult`, `weight_decay`."
    )
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())

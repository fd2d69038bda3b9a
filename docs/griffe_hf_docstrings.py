"""Griffe extension for the API pages: read our transformers-style docstrings as Google-style ones.

The trainers and configs document their parameters the way transformers and TRL do, which Google-style parsing
misreads in three places. This extension rewrites the docstring text before griffe parses it:

- `[`Name`]` / `[`~module.Name`]` (doc-builder cross-references) become plain code, `Name`;
- `> Heading` lines that group parameters are dropped (the page's own headings do that job), and so are the blank
  lines around them, which would otherwise end the section;
- a parameter entry whose names wrap over several lines (`a (`int`), b (`int`),` then `c (`int`):`) is joined into one
  line, so that the entry keeps its description instead of being skipped;
- `name (`type`, *optional*, defaults to `x`):` becomes `name:`, so that the table shows the type and default of the
  signature (the source of truth) instead of the prose copy.
"""

from __future__ import annotations

import re

import griffe

SECTION_HEADERS = ("Args:", "Arguments:", "Parameters:")
CROSS_REFERENCE = re.compile(r"\[`(~?)([\w.]+)`\](?![\[(])")
TYPED_ITEM = re.compile(r"^(\s*)(\w+) \(.*\):\s*$")


def _plain_reference(match: re.Match) -> str:
    short, name = match.group(1), match.group(2)
    return f"`{name.rsplit('.', 1)[-1] if short else name}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rewrite(text: str) -> str:
    """The docstring `text` with the three rewrites of the module docstring applied."""
    lines = CROSS_REFERENCE.sub(_plain_reference, text).split("\n")
    out: list[str] = []
    section_indent = item_indent = None
    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        if stripped in SECTION_HEADERS:
            section_indent, item_indent = _indent(line), None
        elif section_indent is not None and not stripped:
            following = next((other for other in lines[i + 1 :] if other.strip()), "")
            if _indent(following) > section_indent:
                i += 1  # a blank line inside the parameters section
                continue
        elif section_indent is not None:
            if _indent(line) <= section_indent:
                section_indent = None  # the parameters section ended
            elif stripped.startswith("> "):
                i += 1
                continue
            else:
                item_indent = _indent(line) if item_indent is None else item_indent
                if _indent(line) == item_indent and not stripped.endswith(":"):
                    parts, i = [stripped], i + 1
                    while i < len(lines) and lines[i].strip() and not parts[-1].endswith(":"):
                        parts.append(lines[i].strip())
                        i += 1
                    out.append(" " * item_indent + " ".join(parts))
                    continue
                if _indent(line) == item_indent:
                    line = TYPED_ITEM.sub(r"\1\2:", line)
        out.append(line)
        i += 1
    return "\n".join(out)


class HFDocstrings(griffe.Extension):
    """Apply `rewrite` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)

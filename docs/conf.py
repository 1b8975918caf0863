"""Sphinx configuration: ``python -m sphinx -W --keep-going -b html docs build/docs``.

The README and docs/conventions.md stay Markdown (GitHub shows them); the pages include them, and the
``include-read`` hook below turns the Markdown they use (headings, lists, pipe tables, code fences, inline
code, emphasis, links) into reStructuredText.
"""
import re

import deformcp

project = "deformcp"
release = version = deformcp.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
html_static_path = ["_static"]
autodoc_member_order = "bysource"

HEADINGS = {1: "=", 2: "-", 3: "~", 4: "^"}
CODE_SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
LONE_STAR = re.compile(r"(?<![*\w])\*(?=[\s\d(])|(?<=[\s\d)])\*(?![*\w])")


def _text(text: str) -> str:
    """One line of Markdown prose as reStructuredText: code spans, links, and characters rst would read as markup."""
    pieces = CODE_SPAN.split(text.replace("\\|", "|"))
    out = []
    for i, piece in enumerate(pieces):
        if i % 2:
            out.append(f"\\ ``{piece}``\\ ")
            continue
        piece = LONE_STAR.sub(r"\\*", piece.replace("|", "\\|"))
        piece = re.sub(r"(\w)_(?=\W|$)", r"\1\\_", piece)
        out.append(LINK.sub(lambda m: f"\\ `{m[1]} <{m[2]}>`__\\ " if "://" in m[2] else m[1], piece))
    return "".join(out)


def _table(rows: list[str]) -> list[str]:
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]] for row in rows]
    del cells[1]                                       # the |---|---| rule
    out = [".. list-table::", "   :header-rows: 1", ""]
    for row in cells:
        out += [f"   {'*' if j == 0 else ' '} - {_text(cell)}".rstrip() for j, cell in enumerate(row)]
    return out + [""]


def markdown_to_rst(markdown: str) -> str:
    """The subset of Markdown the README and docs/conventions.md use, as reStructuredText."""
    out, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = lines.index("```", i + 1)
            out += ["", f".. code-block:: {line[3:] or 'text'}", ""]
            out += [f"   {code}".rstrip() for code in lines[i + 1:end]] + [""]
            i = end + 1
            continue
        if line.startswith("|"):
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            out += [""] + _table(lines[i:end])
            i = end
            continue
        heading = re.match(r"(#+) (.*)", line)
        if heading:
            title = _text(heading[2])
            out += ["", title, HEADINGS[len(heading[1])] * len(title), ""]
        elif re.match(r"(- |\d+\. )", line) and out and out[-1] and not re.match(r"\s*(- |\d+\. )", out[-1]) \
                and not out[-1].startswith(" "):
            out += ["", _text(line)]                   # rst wants a blank line before a list
        else:
            out.append(_text(line))
        i += 1
    return "\n".join(out) + "\n"


def _include_read(app, relative_path, parent_docname, content):
    if relative_path.suffix == ".md":
        content[0] = markdown_to_rst(content[0])


def setup(app):
    app.connect("include-read", _include_read)

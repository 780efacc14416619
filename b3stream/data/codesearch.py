"""Real (docstring summary -> function source) retrieval pairs, mined from the
Python standard library and the site-packages of the running interpreter.

The recipe follows the spirit of the CodeSearchNet corpus (Husain et al., 2019,
"CodeSearchNet Challenge: Evaluating the State of Semantic Code Search"): a
function's documentation summary is the query and the function's code, with the
docstring taken out, is the positive.  The filters, in our own formulation:

Files
  * only ``.py`` files; the scanned roots are the stdlib directory and the
    purelib/platlib directories (:func:`codesearch_roots`), walked in sorted
    order (a directory's files, then its subdirectories) so the output is the
    same on every run in a given environment;
  * test code is skipped: directories ``test``, ``tests``, ``testing`` and
    ``_test*``; files ``test_*.py``, ``*_test.py``, ``test.py``, ``tests.py``,
    ``conftest.py``;
  * vendored copies (``_vendor``, ``vendor``, ``_vendored``, ``vendored``,
    e.g. ``pip/_vendor``) are skipped because they duplicate other packages;
    so are ``b3stream`` itself, ``__pycache__``, installer metadata
    (``*.dist-info``/``*.egg-info``), top-level names starting with ``__``
    (editable-install finders) and, inside the stdlib, ``site-packages``;
  * files larger than 2 MB (generated tables) are skipped; files that are not
    valid UTF-8 or do not parse with this interpreter's ``ast`` are skipped and
    counted (see ``stats``).  Nothing scanned is ever imported.

Functions (``def`` and ``async def``, methods and nested functions included)
  * names starting with ``_`` (private and dunder) or containing ``test`` are
    dropped;
  * the function must have a docstring whose summary -- the first paragraph,
    cut before the first section header (Google ``Args:``, NumPy underlined
    ``Parameters``/``-----``, Sphinx ``:param``, doctest ``>>>``, rst
    ``.. directive::``) with whitespace collapsed -- has at least 3 words, at
    most 128 words, and is mostly letters (>= 60% of its non-space characters);
  * summaries mentioning "deprecated" or starting with "See ..."/"Alias for"
    are dropped: they point elsewhere instead of describing the code; so are
    docstrings that open with a parameter entry (``x (`int`): ...`` or
    ``x : int``) instead of a summary; a trailing ``:`` (which introduced a
    now-removed example or list) is stripped;
  * the code is the function's source lines (decorators kept) minus the
    docstring's lines, dedented; after removing the docstring the body must
    keep >= 3 non-blank, non-comment lines, and the whole function must be at
    most 200 lines and 8000 characters (longer ones are rarely describable by
    a one-line summary and waste sequence length);
  * pairs whose summary occurs verbatim in the code (e.g. an error message
    repeating it) are dropped, since the match would be trivial.

Deduplication: first occurrence wins, keyed on whitespace-normalised code and
on lower-cased whitespace-normalised query, so copied helpers (e.g. the same
function in two packages) appear once.

Each pair is ``{"query", "positive", "task", "group", "source"}`` where
``task`` is ``"stdlib"`` for the standard library and the top-level package
name (``"torch"``, ``"numpy"``) for site-packages; ``group`` is the dotted
package the module lives in (``"stdlib.email.mime"``, ``"numpy.linalg"``; a
top-level module is its own group), meant for leak-free train/test splits;
``source`` is ``"relative/path.py:qualname"``.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

MAX_FILE_BYTES = 2_000_000
MAX_CODE_LINES = 200
MAX_CODE_CHARS = 8000
MIN_BODY_LINES = 3
MIN_QUERY_WORDS = 3
MAX_QUERY_WORDS = 128
MIN_ALPHA_FRACTION = 0.6

_TEST_DIRS = {"test", "tests", "testing"}
_SKIP_DIRS = {"__pycache__", "_vendor", "vendor", "_vendored", "vendored", "site-packages", "dist-packages"}
_SKIP_TOP = {"b3stream"}

# Section names that end the summary (Google / NumPy / Sphinx prose headers).
_SECTIONS = (
    r"args|arguments|parameters|params|other parameters|keyword args|keyword arguments|"
    r"returns?|yields?|raises|exceptions?|examples?|example usage|usage|notes?|"
    r"warnings?|see also|attributes|references|todo|methods"
)
# A line that is a header on its own ("Returns", "Args:", "See Also").
_HEADER_LINE = re.compile(rf"^(?:{_SECTIONS})\s*:*\s*$", re.I)
# A line that opens a section with text after the colon ("Note: slow").
_HEADER_START = re.compile(rf"^(?:{_SECTIONS})\s*:", re.I)
# Field lists, doctests and rst directives.
_MARKUP_START = re.compile(
    r"^(?::(?:param|parameter|arg|argument|key|keyword|kwarg|type|returns?|rtype|raises?|"
    r"except|exception|yields?|ytype|ivar|var|cvar)\b|>>>|\.\.\. |\.\. )"
)
# NumPy-style underline below a header ("----------").
_UNDERLINE = re.compile(r"^([-=~^\"'`*+#])\1{2,}$")
# The same markers appearing mid-paragraph: cut there too.
_INLINE_CUT = re.compile(
    r"(?::(?:param|type|returns?|rtype|raises?|arg|keyword)\b|>>>|"
    r"\b(?:Args|Arguments|Parameters|Returns|Yields|Raises|Examples?|Notes?|See Also)\s*:)"
)
# Fields holding nested statements (if/for/while/with/try/match/class/def bodies).
_BLOCK_FIELDS = ("body", "handlers", "orelse", "finalbody", "cases")  # source order
_POINTER = re.compile(r"^(?:see\b|alias(?:es)? (?:for|of)\b)", re.I)
# Docstrings that open straight with a parameter entry, "x (`int`): ..." (Google,
# e.g. transformers' auto_docstring) or "x : int" (NumPy): no summary to use.
_PARAM_ENTRY = re.compile(r"^\**[A-Za-z_][\w.]*\s*(?:\([^)]*\)\s*:|\s:\s)")


def codesearch_roots() -> list[tuple[str, Path]]:
    """The directories scanned, in scan order: stdlib, then purelib/platlib."""
    paths = sysconfig.get_paths()
    roots: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for kind in ("stdlib", "purelib", "platlib"):
        raw = paths.get(kind)
        if not raw or not os.path.isdir(raw):
            continue
        resolved = Path(raw).resolve()
        if resolved not in seen:  # purelib and platlib are usually the same dir
            seen.add(resolved)
            roots.append((kind, resolved))
    return roots


def docstring_summary(doc: str) -> str:
    """First paragraph of a cleaned docstring, cut before any section header."""
    lines = doc.strip().split("\n")
    kept: list[str] = []
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            if kept:
                break  # end of the first paragraph
            continue
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if (_HEADER_LINE.match(line) or _HEADER_START.match(line) or _MARKUP_START.match(line)
                or _UNDERLINE.match(line) or _UNDERLINE.match(nxt)):
            break
        kept.append(line)
    summary = " ".join(" ".join(kept).split())
    cut = _INLINE_CUT.search(summary)
    if cut:
        summary = summary[: cut.start()]
    # A trailing colon introduced the (removed) example or list that followed.
    return summary.rstrip().rstrip(":").rstrip()


def _good_summary(summary: str) -> bool:
    words = [w for w in summary.split() if any(c.isalpha() for c in w)]
    if not MIN_QUERY_WORDS <= len(words) <= MAX_QUERY_WORDS:
        return False
    chars = [c for c in summary if not c.isspace()]
    if sum(c.isalpha() for c in chars) < MIN_ALPHA_FRACTION * len(chars):
        return False  # signatures, formulas, ascii art
    if _PARAM_ENTRY.match(summary) or _POINTER.match(summary):
        return False
    return "deprecated" not in summary.lower()


def _is_code_line(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#")


def _norm(text: str) -> str:
    return " ".join(text.split())


def _function_pair(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> tuple[str, str] | None:
    """(summary, code without docstring) for one function, or None if filtered out."""
    doc = ast.get_docstring(node, clean=True)
    if not doc:
        return None
    summary = docstring_summary(doc)
    if not _good_summary(summary):
        return None
    ds = node.body[0]  # the docstring expression statement
    # Only remove whole lines: skip odd layouts sharing a line with the docstring.
    if ds.lineno <= node.lineno or lines[ds.lineno - 1].encode()[: ds.col_offset].strip():
        return None
    tail = lines[ds.end_lineno - 1].encode()[ds.end_col_offset:].decode(errors="replace").strip()
    if tail and not tail.startswith("#"):
        return None
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    if sum(map(_is_code_line, lines[ds.end_lineno: node.end_lineno])) < MIN_BODY_LINES:
        return None
    kept = lines[start - 1: ds.lineno - 1] + lines[ds.end_lineno: node.end_lineno]
    # Strip the def's own indentation (exact, unlike textwrap.dedent which gives up
    # when a multi-line string literal starts at column 0).
    indent = node.col_offset
    code = "\n".join(ln[indent:] if not ln[:indent].strip() else ln for ln in kept).rstrip()
    code = "\n".join(ln.rstrip() for ln in code.split("\n"))
    if len(kept) > MAX_CODE_LINES or len(code) > MAX_CODE_CHARS:
        return None
    if _norm(summary).lower() in _norm(code).lower():
        return None  # summary leaks verbatim into the code
    return summary, code


def _iter_functions(tree: ast.AST) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualname, node) for every function, methods and nested ones, in source order."""
    # A def is always a statement, so only statement lists need walking; skipping
    # expression subtrees makes this several times faster than ast.walk.
    # Explicit pre-order stack instead of recursion: deeply nested generated code exists.
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            prefix = f"{prefix}{node.name}."
        children = [child for field in _BLOCK_FIELDS for child in getattr(node, field, ())]
        stack.extend((child, prefix) for child in reversed(children))


def pairs_from_source(text: str, task: str, group: str, relpath: str) -> list[dict]:
    """All candidate pairs of one module's source (before cross-file dedup).

    Raises SyntaxError / ValueError / RecursionError if ``text`` does not parse.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences etc. in old code
        tree = ast.parse(text)
    # Split on "\n" only: str.splitlines also breaks on form feeds, which ast does not.
    lines = text.split("\n")
    pairs = []
    for qualname, node in _iter_functions(tree):
        if node.name.startswith("_") or "test" in node.name.lower():
            continue
        found = _function_pair(node, lines)
        if found:
            pairs.append({"query": found[0], "positive": found[1], "task": task,
                          "group": group, "source": f"{relpath}:{qualname}"})
    return pairs


def _module_files(kind: str, root: Path) -> Iterator[tuple[str, str, Path]]:
    """(task, relpath, path) for each candidate file under one root, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in _SKIP_DIRS and d not in _TEST_DIRS and not d.startswith("_test")
            and "." not in d  # *.dist-info, *.egg-info, *.libs: not importable packages
            and not (rel_dir == Path(".") and (d.startswith("__") or d in _SKIP_TOP))
        )
        for name in sorted(filenames):
            if (not name.endswith(".py") or name.startswith("test_") or name.endswith("_test.py")
                    or name in ("conftest.py", "test.py", "tests.py")):
                continue
            rel = (rel_dir / name).as_posix()
            top = rel.split("/")[0].removesuffix(".py")
            if top.startswith("__") or top in _SKIP_TOP:
                continue
            yield ("stdlib" if kind == "stdlib" else top), rel, Path(dirpath) / name


def _group(task: str, relpath: str) -> str:
    parts = relpath.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]  # a package's __init__ belongs to the package itself
    elif len(parts) > 1:
        parts = parts[:-1]  # a submodule belongs to its parent package
    dotted = ".".join(parts)
    return f"stdlib.{dotted}" if task == "stdlib" else dotted


def iter_codesearch_pairs(packages: list[str] | None = None, max_pairs: int | None = None,
                          progress: bool = True, *, stats: dict | None = None) -> Iterator[dict]:
    """Yield deduplicated {"query", "positive", "task", "group", "source"} pairs.

    ``packages`` restricts the scan to these tasks ("stdlib", "torch", ...); a
    stdlib top-level module name ("json", "email") also selects that module.
    ``max_pairs`` stops early.  If ``stats`` is a dict it is filled with counts
    (files, too_large, unreadable, unparsable, candidates, duplicates, pairs).
    """
    from ..progress import progress_bar

    wanted = set(packages) if packages is not None else None
    files = []
    for kind, root in codesearch_roots():
        for task, rel, path in _module_files(kind, root):
            top = rel.split("/")[0].removesuffix(".py")
            if wanted is None or task in wanted or top in wanted:
                files.append((task, rel, path))

    counts = dict(files=len(files), too_large=0, unreadable=0, unparsable=0, candidates=0, duplicates=0, pairs=0)
    if stats is not None:
        stats.clear()
        stats.update(counts)
        counts = stats
    seen_code: set[bytes] = set()
    seen_query: set[bytes] = set()

    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    bar = progress_bar(files, desc="codesearch", unit="file", file=sys.stderr, disable=not progress)
    try:
        for task, rel, path in bar:
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    counts["too_large"] += 1
                    continue
                text = path.read_bytes().decode("utf-8-sig")
            except (OSError, UnicodeDecodeError):
                counts["unreadable"] += 1
                continue
            try:
                pairs = pairs_from_source(text, task, _group(task, rel), rel)
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                counts["unparsable"] += 1
                continue
            for pair in pairs:
                counts["candidates"] += 1
                kc, kq = key(_norm(pair["positive"])), key(_norm(pair["query"]).lower())
                if kc in seen_code or kq in seen_query:
                    counts["duplicates"] += 1
                    continue
                seen_code.add(kc)
                seen_query.add(kq)
                counts["pairs"] += 1
                yield pair
                if max_pairs is not None and counts["pairs"] >= max_pairs:
                    return
            bar.set_postfix(pairs=counts["pairs"], refresh=False)
    finally:
        bar.close()

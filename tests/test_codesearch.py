import ast
import re
import textwrap

import pytest

from b3stream.data import codesearch as cs
from b3stream.data.codesearch import (
    codesearch_roots,
    docstring_summary,
    iter_codesearch_pairs,
    pairs_from_source,
)

HEADER = re.compile(r"(\bArgs:|\bReturns:|\bRaises:|:param\b|:return|>>>|^Parameters\b|-{3,}|={3,})")
TEST_PART = re.compile(r"(^|/)(tests?|testing|_test[^/]*)/|(^|/)(test_[^/]*|[^/]*_test\.py|conftest\.py)$")


def norm(text):
    return " ".join(text.split())


def _src(code):
    return textwrap.dedent(code).lstrip("\n")


# --------------------------------------------------------------- real stdlib scan


@pytest.fixture(scope="module")
def stdlib_pairs():
    return list(iter_codesearch_pairs(packages=["stdlib"], max_pairs=500, progress=False))


def test_roots_start_with_stdlib():
    roots = codesearch_roots()
    assert roots[0][0] == "stdlib"
    assert (roots[0][1] / "os.py").is_file()
    assert len({path for _, path in roots}) == len(roots)


def test_stdlib_pairs_are_clean(stdlib_pairs):
    assert len(stdlib_pairs) == 500
    for pair in stdlib_pairs:
        assert set(pair) == {"query", "positive", "task", "group", "source"}
        assert pair["task"] == "stdlib" and pair["group"].startswith("stdlib.")
        query, code = pair["query"], pair["positive"]
        assert len(query.split()) >= 3 and query == norm(query)
        assert not HEADER.search(query), query
        assert "deprecated" not in query.lower()
        assert norm(query).lower() not in norm(code).lower()
        relpath, qualname = pair["source"].split(":")
        assert relpath.endswith(".py") and not TEST_PART.search(relpath), relpath
        name = qualname.split(".")[-1]
        assert not name.startswith("_") and "test" not in name.lower()
        # The positive is a self-contained, dedented function without its docstring.
        func = ast.parse(code).body[0]
        assert isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and func.name == name
        assert ast.get_docstring(func) is None
        body = code.split("\n")[func.body[0].lineno - 1:]
        assert sum(1 for ln in body if ln.strip() and not ln.strip().startswith("#")) >= 3
        assert len(code) <= cs.MAX_CODE_CHARS


def test_stdlib_pairs_have_no_duplicates(stdlib_pairs):
    assert len({norm(p["query"]).lower() for p in stdlib_pairs}) == len(stdlib_pairs)
    assert len({norm(p["positive"]) for p in stdlib_pairs}) == len(stdlib_pairs)


def test_scan_is_deterministic(stdlib_pairs):
    again = list(iter_codesearch_pairs(packages=["stdlib"], max_pairs=500, progress=False))
    assert again == stdlib_pairs


def test_stdlib_module_name_selects_module():
    pairs = list(iter_codesearch_pairs(packages=["json"], progress=False))
    assert pairs and all(p["source"].startswith("json/") for p in pairs)
    assert all(p["task"] == "stdlib" and p["group"] == "stdlib.json" for p in pairs)


# ------------------------------------------------------------- docstring summary


@pytest.mark.parametrize(
    "doc, expected",
    [
        ("Add two numbers together.\n\nArgs:\n    a: first", "Add two numbers together."),
        ("Add two numbers\ntogether quickly.\nArgs:\n    a: first", "Add two numbers together quickly."),
        ("Add two numbers together.\nParameters\n----------\na : int", "Add two numbers together."),
        ("Add two numbers together.\n:param a: first\n:returns: sum", "Add two numbers together."),
        ("Add two numbers together.\n>>> add(1, 2)\n3", "Add two numbers together."),
        ("Add two numbers together. Returns: the sum", "Add two numbers together."),
        ("Add two numbers together, e.g.:\n\n    add(1, 2)", "Add two numbers together, e.g."),
        ("\n\nAdd   two\tnumbers.\n\nMore text here.", "Add two numbers."),
        ("Returns\n-------\nint", ""),
    ],
)
def test_docstring_summary(doc, expected):
    assert docstring_summary(doc) == expected


# ------------------------------------------------------- function-level filters

FAKE_MODULE = _src('''
    import functools

    def add_numbers(a, b):
        """Add two numbers and return the result.

        Args:
            a: first number.
            b: second number.
        """
        total = a + b
        total = int(total)
        return total

    def no_docstring(a):
        x = a
        y = x
        return y

    def _private_helper(a):
        """Compute a private helper value for internal use."""
        x = a
        y = x
        return y

    def test_something_here(a):
        """Check that something works as expected."""
        x = a
        y = x
        assert y

    def too_short(a):
        """Return the argument unchanged to the caller."""
        # comments and blank lines do not count

        return a

    def old_api(a):
        """Deprecated alias kept for backwards compatibility."""
        x = a
        y = x
        return y

    def tiny_doc(a):
        """Too short."""
        x = a
        y = x
        return y

    def echo_summary(a):
        """Raise an error describing bad input."""
        x = a
        y = x
        raise ValueError("Raise an error describing bad input.")

    class Greeter:
        def __init__(self, name):
            """Create a greeter that remembers the name."""
            self.name = name
            self.count = 0
            self.done = False

        @functools.lru_cache(maxsize=None)
        def greet(self, loud=False):
            """Build a friendly greeting for the stored name.

            Parameters
            ----------
            loud : bool
            """
            text = "hello " + self.name
            if loud:
                text = text.upper()
            return text

        async def fetch_remote(self):
            """Fetch the greeting from a remote service."""
            data = await self.client.get()
            data = data.strip()
            return data
''')


def test_pairs_from_source_filters_functions():
    pairs = pairs_from_source(FAKE_MODULE, "fakepkg", "fakepkg.sub", "fakepkg/sub/mod.py")
    by_name = {p["source"].split(":")[1]: p for p in pairs}
    assert list(by_name) == ["add_numbers", "Greeter.greet", "Greeter.fetch_remote"]
    for p in pairs:
        assert p["task"] == "fakepkg" and p["group"] == "fakepkg.sub"
        assert p["source"].startswith("fakepkg/sub/mod.py:")

    add = by_name["add_numbers"]
    assert add["query"] == "Add two numbers and return the result."
    assert add["positive"] == "def add_numbers(a, b):\n    total = a + b\n    total = int(total)\n    return total"

    greet = by_name["Greeter.greet"]
    assert greet["query"] == "Build a friendly greeting for the stored name."
    # Decorator kept, method dedented to column 0, docstring (and its sections) gone.
    assert greet["positive"].startswith("@functools.lru_cache(maxsize=None)\ndef greet(self, loud=False):\n")
    assert "Parameters" not in greet["positive"] and '"""' not in greet["positive"]
    assert by_name["Greeter.fetch_remote"]["positive"].startswith("async def fetch_remote(self):")


def test_pairs_from_source_length_caps():
    body = "\n".join(f"    x{i} = {i}" for i in range(cs.MAX_CODE_LINES + 5))
    src = f'def long_function():\n    """Do a great many assignments in a row."""\n{body}\n'
    assert pairs_from_source(src, "t", "t", "t.py") == []


def test_pairs_from_source_keeps_form_feeds_aligned():
    # str.splitlines() would treat \x0c as a line break and shift every line number.
    src = _src('''
        \x0c
        def split_words(text):
            """Split a text into its separate words."""
            words = text.split()
            words = [w for w in words if w]
            return words
    ''')
    [pair] = pairs_from_source(src, "t", "t", "t.py")
    assert pair["positive"].startswith("def split_words(text):\n    words = text.split()")


def test_pairs_from_source_raises_on_bad_syntax():
    with pytest.raises(SyntaxError):
        pairs_from_source("def broken(:\n    pass\n", "t", "t", "t.py")


# ------------------------------------------------------------ file-level filters

GOOD_FUNC = _src('''
    def {name}(a):
        """{doc}"""
        x = a + 1
        y = x * 2
        return y
''')


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


@pytest.fixture()
def fake_site(tmp_path, monkeypatch):
    lib, site = tmp_path / "lib", tmp_path / "site"
    files = {
        (lib, "email/mime/text.py"): ("make_text", "Build a plain text message part."),
        (lib, "email/__init__.py"): ("parse_message", "Parse a message from a string."),
        (lib, "os2.py"): ("walk_tree", "Walk a directory tree top down."),
        (lib, "test/test_os2.py"): ("walk_check", "Check walking a directory tree."),
        (site, "mypkg/__init__.py"): ("load_things", "Load the things from the disk."),
        (site, "mypkg/linalg/solve.py"): ("solve_system", "Solve a linear system of equations."),
        (site, "mypkg/copy.py"): ("solve_again", "Solve a linear system of equations."),  # dup query
        (site, "mypkg/tests/helpers.py"): ("make_fixture", "Make a fixture for the checks."),
        (site, "mypkg/testing/tools.py"): ("assert_close", "Assert that values are close."),
        (site, "mypkg/_testutils/tools.py"): ("make_data", "Make random data for checks."),
        (site, "mypkg/test_mod.py"): ("check_one", "Check the first thing works."),
        (site, "mypkg/mod_test.py"): ("check_two", "Check the second thing works."),
        (site, "mypkg/conftest.py"): ("make_config", "Make the pytest configuration."),
        (site, "pip/_vendor/lib.py"): ("vendored_fn", "Do vendored work for pip."),
        (site, "b3stream/data/x.py"): ("own_code", "Our own code is never mined."),
        (site, "single.py"): ("single_fn", "Do the work of a single module."),
        (site, "mypkg-1.0.dist-info/x.py"): ("meta_fn", "Metadata should never be scanned."),
    }
    for (root, rel), (name, doc) in files.items():
        _write(root, rel, GOOD_FUNC.format(name=name, doc=doc))
    _write(site, "mypkg/broken.py", "def broken(:\n")
    _write(site, "mypkg/latin.py", "# caf\xe9\n".encode("latin-1"))
    _write(site, "mypkg/notes.txt", GOOD_FUNC.format(name="txt_fn", doc="Text files are not code."))
    monkeypatch.setattr(cs, "codesearch_roots", lambda: [("stdlib", lib), ("purelib", site)])
    return lib, site


def test_iterator_file_filters_tasks_and_groups(fake_site):
    stats = {}
    pairs = list(iter_codesearch_pairs(progress=False, stats=stats))
    got = [(p["source"], p["task"], p["group"]) for p in pairs]
    # Scan order: roots in order; in each directory its files (sorted) before its
    # subdirectories (sorted), as os.walk yields them.
    assert got == [
        ("os2.py:walk_tree", "stdlib", "stdlib.os2"),
        ("email/__init__.py:parse_message", "stdlib", "stdlib.email"),
        ("email/mime/text.py:make_text", "stdlib", "stdlib.email.mime"),
        ("single.py:single_fn", "single", "single"),
        ("mypkg/__init__.py:load_things", "mypkg", "mypkg"),
        ("mypkg/copy.py:solve_again", "mypkg", "mypkg"),
    ]
    # copy.py is scanned before linalg/solve.py, whose identical query is dropped.
    assert stats["unparsable"] == 1 and stats["unreadable"] == 1
    assert stats["duplicates"] == 1 and stats["pairs"] == len(pairs)


def test_iterator_packages_and_max_pairs(fake_site):
    only = list(iter_codesearch_pairs(packages=["single", "email"], progress=False))
    assert [p["source"] for p in only] == [
        "email/__init__.py:parse_message", "email/mime/text.py:make_text", "single.py:single_fn"]
    assert [p["source"] for p in iter_codesearch_pairs(["mypkg"], progress=False)] == [
        "mypkg/__init__.py:load_things", "mypkg/copy.py:solve_again"]
    assert len(list(iter_codesearch_pairs(max_pairs=2, progress=False))) == 2

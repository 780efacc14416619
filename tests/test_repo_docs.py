"""The repository documents itself: no code cites a design file that is not in the repository, and
docs/architecture.md and the README's layout name every module of the package."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_code_cites_no_file_outside_the_repository():
    offenders = [str(p.relative_to(REPO)) for folder in ("b3stream", "tools", "configs", "ds_configs")
                 for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".json")
                 and ("DESIGN.md" in p.read_text() or "NOTES-stack" in p.read_text())]
    assert offenders == []


def test_architecture_doc_names_every_module():
    """By file name (``loop.py``, not ``loop``): a bare stem such as ``export`` or ``reader`` is a common
    word that any paragraph may hold."""
    doc = (REPO / "docs" / "architecture.md").read_text() + (REPO / "README.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in (REPO / "b3stream").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and p.name not in doc]
    assert missing == [], f"modules the docs never mention: {missing}"


# -- the README is the short path; docs/ holds the rest ------------------------------------------------------

import re  # noqa: E402  (the checks below parse Markdown)
import shlex  # noqa: E402

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_reads_in_ten_minutes():
    """Issue 36: measurement history and the full reference live in docs/, so the README stays short."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 340, f"README.md has {len(lines)} lines; move detail to docs/usage.md or docs/measurements.md"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a '# comment' in a code block is no heading
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_relative_links_in_readme_and_docs_resolve():
    """Every relative link (and image) in README.md and docs/*.md names a file that exists, and a #section of a
    Markdown file names one of its headings: moving a section must not leave a dead link behind."""
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            name, _, anchor = target.partition("#")
            path = (doc.parent / name).resolve() if name else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert broken == []
    assert len(LINK.findall((REPO / "README.md").read_text())) >= 10  # the README does link into docs/


def test_readme_test_command_is_the_ci_command():
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if "pytest" in line and not line.lstrip().startswith("#")]
    assert ci, ".ci/run runs no pytest command"
    readme = (REPO / "README.md").read_text()
    assert all(command in readme for command in ci)


def readme_shell_commands() -> list[list[str]]:
    """The README's ```bash blocks, one token list per command (continuation lines joined, comments and the
    trailing ``&`` dropped, ``a && b`` split)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                tokens = shlex.split(part, comments=True)
                if tokens and tokens[-1] == "&":
                    tokens.pop()
                if tokens:
                    commands.append(tokens)
    return commands


def b3stream_invocations() -> list[tuple[str, list[str]]]:
    """(subcommand, its arguments) for every b3stream command in the README, launched or not:
    ``b3stream mine ...``, ``torchrun ... -m b3stream refresh ...``, ``torchrun ... -m b3stream.train ...``,
    ``deepspeed --module b3stream.train ...``."""
    found = []
    for tokens in readme_shell_commands():
        if Path(tokens[0]).name == "b3stream":
            found.append((tokens[1], tokens[2:]))
        for flag in ("-m", "--module"):
            if flag in tokens[:-1]:
                module = tokens[tokens.index(flag) + 1]
                rest = tokens[tokens.index(flag) + 2:]
                if module == "b3stream":
                    found.append((rest[0], rest[1:]))
                elif module == "b3stream.train":
                    found.append(("train", rest))
    return found


def test_readme_commands_use_flags_and_keys_the_code_has():
    """Every ``--flag`` of a b3stream command in the README is one its parser defines, every ``key=value`` of
    a ``train`` command is a TrainConfig override that loads, every ``--set`` a MineConfig one, and every
    file under configs/, ds_configs/ or tools/ that a command names exists."""
    from b3stream.cli import _subparsers, build_parser
    from b3stream.config import ConfigError, MineConfig, TrainConfig, apply_overrides

    parsers = _subparsers(build_parser())
    invocations = b3stream_invocations()
    assert {command for command, _ in invocations} >= {"prepare", "mine", "train", "refresh", "evaluate", "inspect"}
    wrong = []
    for command, args in invocations:
        known = {s for action in parsers[command]._actions for s in action.option_strings}
        wrong += [f"b3stream {command} {a}" for a in args if a.startswith("--") and a.split("=")[0] not in known]
        overrides = ([a for a in args if "=" in a and not a.startswith("-")] if command == "train"
                     else [args[i + 1] for i, a in enumerate(args) if a == "--set"] if command == "mine" else [])
        try:
            apply_overrides(TrainConfig() if command == "train" else MineConfig(), overrides)
        except ConfigError as e:  # a placeholder folder (student.model=/models/Mistral-7B) is not there: fine
            if "does not exist" not in str(e):
                wrong.append(f"b3stream {command} {' '.join(overrides)}: {e}")
    assert wrong == []
    named = {t for tokens in readme_shell_commands() for t in tokens
             if re.match(r"(configs|ds_configs|tools)/", t)}
    assert named and [t for t in named if not (REPO / t).exists()] == []


def test_every_refresh_key_is_documented():
    """The README's refresh.* table moved to docs/usage.md: it must still name every RefreshConfig field."""
    from dataclasses import fields

    from b3stream.config import RefreshConfig

    usage = (REPO / "docs" / "usage.md").read_text()
    table = usage[usage.index("The `refresh.*` keys"):]
    missing = [f.name for f in fields(RefreshConfig) if f"`{f.name}`" not in table.split("\n\n", 2)[1]]
    assert missing == []

"""A multi-task text mixture built offline from Debian packages: the shape of the B3 paper's MMEB training mix
(retrieval, definitions, classification whose positives are label texts), in text.

    python tools/mixture.py fetch ROOT              # apt-get download + dpkg-deb -x of the packages into ROOT
    python tools/mixture.py build ROOT OUT          # OUT/pairs.jsonl, OUT/prompts.yaml, OUT/sources.json
    b3stream prepare jsonl OUT/pairs.jsonl --out data/mixture --query-field query --positive-field positive \\
        --task-field task --group-field group --prompts OUT/prompts.yaml

No package is installed on the system: ``fetch`` unpacks the .deb files under ROOT (``apt-get download`` needs
only a Debian/Ubuntu apt configuration, no root). Tasks, each with its own instruction prompts (paper section
3.3) and ``group`` so that a held-out split never shares a word, a headword or a page with training:

========================  ======================================  ===============================  ==========
task                      query                                   positive                         kind
========================  ======================================  ===============================  ==========
code                      a docstring's summary                   the function's code              retrieval
wordnet-words             a WordNet gloss                         the synset's words               retrieval
wordnet-category          a WordNet gloss                         its lexicographer file's name    labels
<dict>-define             a headword                              its definition                   retrieval
<dict>-name               a definition (headword masked)          the headword                     retrieval
manpages                  a manual page's NAME line               its DESCRIPTION section          retrieval
fortunes                  a fortune's text                        its category file's name         labels
========================  ======================================  ===============================  ==========

(<dict> is foldoc, jargon and gcide.) In the two label tasks many queries share one positive text, as in
MMEB's classification sets; b3stream masks same-text positives as negatives. ``sources.json`` records each
package's version (read from its ``changelog.Debian.gz``) and the pairs per task.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PACKAGES = ("wordnet-base", "dict-foldoc", "dict-gcide", "dict-jargon", "manpages", "manpages-dev", "fortunes",
            "fortunes-min")
DICTS = ("foldoc", "jargon", "gcide")

# WordNet's lexicographer files, by number (WordNet 3.0, lexnames(5WN)); data.* lines carry the number
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
            "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
            "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
            "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
            "adj.ppl").split()

# Instruction prompts per task (query side, positive side), in the paper's spirit: say what is searched.
PROMPTS = {
    "code": ("Find the code for this description: ", "Code: "),
    "wordnet-words": ("Find the words this definition defines: ", "Words: "),
    "wordnet-category": ("Classify the semantic category of this definition: ", "Category: "),
    "define": ("Find the definition of this term: ", "Definition: "),
    "name": ("Find the term this definition defines: ", "Term: "),
    "manpages": ("Find the manual page description of this command or function: ", "Manual description: "),
    "fortunes": ("Classify the topic of this quotation: ", "Topic: "),
}

MAX_CHARS = 1000  # long definitions and manual sections are cut: the student reads a few hundred tokens at most


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:MAX_CHARS]


# -- sources: each a function from the unpacked ROOT to (query, positive, task, group) rows -----------------


def wordnet_pairs(root: Path) -> list[dict]:
    """Each synset of WordNet's data.noun / .verb / .adj / .adv: gloss -> its words (retrieval), gloss -> its
    lexicographer file (``noun.animal``; labels). Grouped by the synset's first word: all senses of a word
    fall in one split."""
    rows = []
    folder = root / "usr/share/wordnet"
    for part in ("noun", "verb", "adj", "adv"):
        path = folder / f"data.{part}"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            f = fields.split()
            try:
                count = int(f[3], 16)
                words = [f[4 + 2 * i].replace("_", " ") for i in range(count)]
                category = LEXNAMES[int(f[1])]
            except (IndexError, ValueError):
                raise SystemExit(f"{path}: not a WordNet data line: {line[:80]!r}") from None
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]  # adjective markers: "(a)", "(p)"
            definition = _clean(gloss.split(";")[0].strip().strip('"'))
            if not definition or not words:
                continue
            group = f"wordnet:{words[0].lower()}"
            rows.append({"query": definition, "positive": ", ".join(words), "task": "wordnet-words", "group": group})
            rows.append({"query": definition, "positive": category, "task": "wordnet-category",
                         "group": group})
    return rows


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(code: str) -> int:
    n = 0
    for c in code:
        n = n * 64 + _B64.index(c)
    return n


def dictd_entries(root: Path, name: str) -> list[tuple[str, str]]:
    """(headword, definition) of a dictd dictionary (``NAME.index`` + ``NAME.dict.dz``, a gzip file): one per
    entry (entries several headwords point at are taken once, under the first), the headword line removed
    from the definition."""
    folder = root / "usr/share/dictd"
    index, data = folder / f"{name}.index", folder / f"{name}.dict.dz"
    if not (index.is_file() and data.is_file()):
        return []
    try:
        body = gzip.open(data).read()
    except (OSError, EOFError) as e:
        raise SystemExit(f"{data}: not a readable dictzip file ({e}); unpack the package again") from None
    seen, out = set(), []
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00"):
            continue  # dictd's own 00-database-* entries
        word, start, size = parts[0], _dictd_number(parts[1]), _dictd_number(parts[2])
        if (start, size) in seen:
            continue
        seen.add((start, size))
        text = body[start:start + size].decode("utf-8", errors="replace")
        lines = text.strip().splitlines()
        definition = "\n".join(lines[1:]) if lines and word.lower() in lines[0].lower() else text
        definition = _clean(_unbracketed(definition).replace("{", "").replace("}", ""))
        if len(definition) >= 20 and 0 < len(word.strip()) <= 40:  # gcide has a few run-together phrase lists
            out.append((word.strip(), definition))
    return out


def _unbracketed(text: str) -> str:
    """``text`` without its [bracketed] asides (gcide's etymologies and sources, nested ones too), and without
    the tail of an aside the removed headword line had opened."""
    while True:
        shorter = re.sub(r"\[[^\[\]]*\]", " ", text)
        if shorter == text:
            break
        text = shorter
    close, open_ = text.find("]"), text.find("[")
    return text[close + 1:] if close >= 0 and (open_ < 0 or close < open_) else text


def dictd_pairs(root: Path, name: str) -> list[dict]:
    """headword -> definition, and definition -> headword with the headword masked in it (else the answer is
    in the question). Grouped by headword."""
    rows = []
    for word, definition in dictd_entries(root, name):
        group = f"{name}:{word.lower()}"
        rows.append({"query": word, "positive": definition, "task": f"{name}-define", "group": group})
        masked = re.sub(re.escape(word), "___", definition, flags=re.IGNORECASE)
        rows.append({"query": masked, "positive": word, "task": f"{name}-name", "group": group})
    return rows


_ROFF_ESCAPES = [(r"\\f[BIRP]|\\f\(..|\\f\[[^\]]*\]", ""), (r"\\-", "-"), (r"\\\(aq", "'"), (r"\\\(dq", '"'),
                 (r"\\\((em|en)", "-"), (r"\\\(..", ""), (r"\\[&|^%]", ""), (r"\\e", "\\\\"), (r"\\ ", " ")]


def _roff_text(lines: list[str]) -> str:
    """Plain text of roff source lines: requests dropped (their arguments kept for font macros), escapes
    resolved."""
    out = []
    for line in lines:
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].partition(" ")
            if request in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB"):
                out.append(rest.replace('"', ""))
            continue
        out.append(line)
    text = " ".join(out)
    for pattern, repl in _ROFF_ESCAPES:
        text = re.sub(pattern, repl, text)
    return _clean(text)


def manpage_pairs(root: Path) -> list[dict]:
    """A page's NAME line (``open, openat, creat - open and possibly create a file``) -> its DESCRIPTION
    section; pages that only include another (``.so``) are skipped. Grouped by page name."""
    rows = []
    for path in sorted((root / "usr/share/man").glob("man*/*.gz")):
        try:
            src = gzip.open(path).read().decode("utf-8", errors="replace").splitlines()
        except (OSError, EOFError):
            continue
        sections: dict[str, list[str]] = {}
        current = None
        for line in src:
            m = re.match(r'\.SH\s+"?([^"]+)"?', line)
            if m:
                current = m.group(1).strip().upper()
                sections.setdefault(current, [])
            elif current is not None:
                sections[current].append(line)
        name, description = _roff_text(sections.get("NAME", [])), _roff_text(sections.get("DESCRIPTION", []))
        if name and len(description) >= 40:
            page = path.name.split(".")[0]
            rows.append({"query": name, "positive": description, "task": "manpages", "group": f"man:{page}"})
    return rows


def fortune_pairs(root: Path) -> list[dict]:
    """Each fortune of each category file (the files without an extension) -> the category's name (labels);
    attribution lines (``-- Kirk, ...``) are dropped so the label is read from the text. Grouped by text."""
    rows = []
    folder = root / "usr/share/games/fortunes"
    for path in sorted(p for p in folder.glob("*") if p.is_file() and not p.suffix) if folder.is_dir() else []:
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = _clean("\n".join(line for line in entry.splitlines() if not re.match(r"\s+--", line)))
            if len(text) >= 20:
                rows.append({"query": text, "positive": path.name, "task": "fortunes", "group": f"fortune:{text[:60]}"})
    return rows


def code_pairs() -> list[dict]:
    """Docstring -> code pairs of the installed Python packages (the project's own code-search source)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from b3stream.data.codesearch import iter_codesearch_pairs

    return [{"query": p["query"], "positive": p["positive"], "task": "code", "group": f"code:{p['group']}"}
            for p in iter_codesearch_pairs(progress=False)]


def package_versions(root: Path) -> dict[str, str]:
    """Each unpacked package's version, from the first line of its Debian changelog."""
    versions = {}
    for package in PACKAGES:
        log = root / "usr/share/doc" / package / "changelog.Debian.gz"
        if log.is_file():
            m = re.match(r"\S+ \(([^)]+)\)", gzip.open(log).readline().decode("utf-8", "replace"))
            versions[package] = m.group(1) if m else "unknown"
    return versions


# -- build and fetch -------------------------------------------------------------------------------------


def prompts_for(task: str) -> dict[str, str]:
    query, positive = PROMPTS.get(task) or PROMPTS[task.rsplit("-", 1)[1]]
    return {"query": query, "positive": positive}


def build(root: Path, out: Path, per_task: int = 3000, seed: int = 0, code: bool = True) -> dict:
    """ROOT (unpacked packages) -> OUT/pairs.jsonl (at most ``per_task`` pairs of each task, a seeded sample),
    OUT/prompts.yaml and OUT/sources.json. Refuses a ROOT with none of the packages, naming what to run."""
    import yaml

    versions = package_versions(root)
    if not versions:
        raise SystemExit(f"{root}: none of the packages {', '.join(PACKAGES)} is unpacked there; run "
                         f"`python tools/mixture.py fetch {root}` (or apt-get download + dpkg-deb -x them)")
    rows = wordnet_pairs(root) + manpage_pairs(root) + fortune_pairs(root)
    for name in DICTS:
        rows += dictd_pairs(root, name)
    if code:
        rows += code_pairs()
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    kept = []
    for task in sorted(by_task):
        items = by_task[task]
        pick = np.sort(rng.choice(len(items), min(per_task, len(items)), replace=False))
        kept += [items[i] for i in pick]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".pairs.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(out / "pairs.jsonl")
    (out / "prompts.yaml").write_text(yaml.safe_dump({t: prompts_for(t) for t in sorted(by_task)}, sort_keys=True))
    sources = {"packages": versions, "per_task": per_task, "seed": seed,
               "pairs": {t: sum(1 for r in kept if r["task"] == t) for t in sorted(by_task)},
               "available": {t: len(v) for t, v in sorted(by_task.items())},
               "labels": {t: len({r["positive"] for r in by_task[t]}) for t in ("wordnet-category", "fortunes")
                          if t in by_task}}
    (out / "sources.json").write_text(json.dumps(sources, indent=2))
    return sources


def fetch(root: Path) -> None:
    """apt-get download the packages and unpack them under ROOT (nothing is installed)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SystemExit("apt-get and dpkg-deb are needed (a Debian or Ubuntu machine); elsewhere download the "
                         f".deb files of {', '.join(PACKAGES)} from packages.debian.org and unpack each with "
                         f"`dpkg-deb -x FILE {root}` or `ar x FILE && tar -xf data.tar.xz -C {root}`")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True)
        for deb in sorted(Path(tmp).glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download and unpack the Debian packages into ROOT")
    f.add_argument("root", type=Path)
    b = sub.add_parser("build", help="ROOT -> OUT/pairs.jsonl, prompts.yaml, sources.json")
    b.add_argument("root", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--per-task", type=int, default=3000, help="at most this many pairs of each task")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-code", action="store_true", help="leave out the code-search task")
    args = ap.parse_args(argv)
    if args.command == "fetch":
        fetch(args.root)
    else:
        sources = build(args.root, args.out, args.per_task, args.seed, code=not args.no_code)
        print(json.dumps(sources, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

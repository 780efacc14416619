"""tools/mixture.py: the multi-task mixture built from unpacked Debian packages, here a tiny ROOT written in the
test in the packages' own formats (WordNet data files, a dictd index + dictzip body, a gzipped roff manual page,
a fortune file, a Debian changelog), so no download is needed."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import mixture  # noqa: E402

WORDNET = """  1 This software and database is being provided to you, the LICENSEE, by Princeton University
00015388 03 n 01 animal 0 005 @ 00004475 n 0000 | a living organism characterized by voluntary movement
02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the genus Canis; "the dog barked all night"
02121620 05 n 02 cat 0 true_cat 0 001 @ 02120997 n 0000 | feline mammal usually having thick soft fur and no ability to roar
07555863 13 n 01 food 0 001 @ 00021265 n 0000 | any substance that can be metabolized by an animal to give energy
"""

MANPAGE = r""".\" a comment
.TH open 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open, openat, creat \- open and possibly create a file
.SH SYNOPSIS
.B #include <fcntl.h>
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
If the file does not exist, it may be created by \fBopen\fP().
.SH RETURN VALUE
A file descriptor.
"""

FORTUNES = """Without followers, evil cannot spread.
\t\t-- Spock, "And The Children Shall Lead", stardate 5029.5
%
Insufficient facts always invite danger.
\t\t-- Spock, "Space Seed", stardate 3141.9
%
"""


def dictd_code(n: int) -> str:
    digits = ""
    while True:
        digits = mixture._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("debroot")
    share = root / "usr/share"
    (share / "wordnet").mkdir(parents=True)
    (share / "wordnet/data.noun").write_text(WORDNET)
    (share / "dictd").mkdir()
    entries = [("foo", "foo\n\n   <jargon> A metasyntactic variable, used when foo is needed.\n"),
               ("bar", "bar\n\n   <jargon> The second metasyntactic variable, after foo. [Jargon File]\n")]
    body, index = b"", []
    for word, text in entries:
        raw = text.encode()
        index.append(f"{word}\t{dictd_code(len(body))}\t{dictd_code(len(raw))}")
        body += raw
    index.insert(0, f"00databaseinfo\t{dictd_code(0)}\t{dictd_code(3)}")
    (share / "dictd/foldoc.index").write_text("\n".join(index) + "\n")
    (share / "dictd/foldoc.dict.dz").write_bytes(gzip.compress(body))
    (share / "man/man2").mkdir(parents=True)
    (share / "man/man2/open.2.gz").write_bytes(gzip.compress(MANPAGE.encode()))
    (share / "man/man2/creat.2.gz").write_bytes(gzip.compress(b".so man2/open.2\n"))  # an include only
    (share / "games/fortunes").mkdir(parents=True)
    (share / "games/fortunes/startrek").write_text(FORTUNES)
    (share / "games/fortunes/startrek.dat").write_bytes(b"\x00\x02binary index")
    (share / "doc/wordnet-base").mkdir(parents=True)
    (share / "doc/wordnet-base/changelog.Debian.gz").write_bytes(
        gzip.compress(b"wordnet (1:3.0-37) unstable; urgency=medium\n\n  * a change\n"))
    return root


def test_each_source_in_its_own_format(root):
    words = mixture.wordnet_pairs(root)
    dog = [r for r in words if r["query"].startswith("a member of the genus Canis")]
    assert {r["task"]: r["positive"] for r in dog} == {"wordnet-words": "dog, domestic dog, Canis familiaris",
                                                        "wordnet-category": "noun.animal"}
    assert all(r["group"] == "wordnet:dog" for r in dog) and '"the dog barked' not in dog[0]["query"]
    assert {r["positive"] for r in words if r["task"] == "wordnet-category"} == {"noun.Tops", "noun.animal",
                                                                                  "noun.food"}
    foldoc = mixture.dictd_pairs(root, "foldoc")
    assert {(r["task"], r["query"]) for r in foldoc if r["task"] == "foldoc-define"} == {
        ("foldoc-define", "foo"), ("foldoc-define", "bar")}
    name = {r["positive"]: r["query"] for r in foldoc if r["task"] == "foldoc-name"}
    assert "foo" not in name["foo"].lower() and "___" in name["foo"]  # the answer is not in the question
    assert "[Jargon File]" not in name["bar"] and not name["bar"].startswith("bar")
    (page,) = mixture.manpage_pairs(root)
    assert page["query"] == "open, openat, creat - open and possibly create a file"
    assert page["positive"].startswith("The open () system call opens the file specified by pathname")
    assert "\\f" not in page["positive"] and "RETURN" not in page["positive"]
    fortunes = mixture.fortune_pairs(root)
    assert [r["positive"] for r in fortunes] == ["startrek", "startrek"]
    assert fortunes[0]["query"] == "Without followers, evil cannot spread."  # attribution dropped
    assert mixture.package_versions(root) == {"wordnet-base": "1:3.0-37"}


def test_build_writes_pairs_prompts_and_versions_that_prepare_reads(root, tmp_path):
    from b3stream.data.manifest import Manifest
    from b3stream.data.prepare import load_prompts, prepare_file
    from b3stream.data.sources import FieldMap

    sources = mixture.build(root, tmp_path / "mix", per_task=2, code=False)
    rows = [json.loads(line) for line in (tmp_path / "mix" / "pairs.jsonl").read_text().splitlines()]
    assert sources["packages"] == {"wordnet-base": "1:3.0-37"}
    assert sources["pairs"]["wordnet-words"] == 2 and sources["available"]["wordnet-words"] == 4
    assert sources["labels"] == {"wordnet-category": 3, "fortunes": 1}
    assert {r["task"] for r in rows} == {"wordnet-words", "wordnet-category", "foldoc-define", "foldoc-name",
                                         "manpages", "fortunes"}
    # the same seed picks the same pairs
    mixture.build(root, tmp_path / "again", per_task=2, code=False)
    assert (tmp_path / "again" / "pairs.jsonl").read_text() == (tmp_path / "mix" / "pairs.jsonl").read_text()

    manifest = prepare_file(str(tmp_path / "mix" / "pairs.jsonl"), "jsonl", str(tmp_path / "ds"),
                            FieldMap(task="task", group="group"),
                            prompts=load_prompts(str(tmp_path / "mix" / "prompts.yaml")), held_out={},
                            progress=False)
    assert set(manifest.tasks) == {r["task"] for r in rows}
    assert Manifest.load(tmp_path / "ds").prompt("fortunes", "query") == "Classify the topic of this quotation: "
    assert manifest.prompt("foldoc-name", "positive") == "Term: "


def test_a_root_without_the_packages_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="python tools/mixture.py fetch"):
        mixture.build(tmp_path, tmp_path / "out", code=False)
    assert not (tmp_path / "out").exists()


def test_damaged_sources_are_named(root, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    data = broken / "usr/share/dictd/foldoc.dict.dz"
    data.write_bytes(data.read_bytes()[:20])  # truncated
    with pytest.raises(SystemExit, match="foldoc.dict.dz: not a readable dictzip file"):
        mixture.dictd_entries(broken, "foldoc")
    (broken / "usr/share/wordnet/data.noun").write_text(WORDNET + "0001 zz n xx | a line that lost its fields\n")
    with pytest.raises(SystemExit, match="data.noun: not a WordNet data line"):
        mixture.wordnet_pairs(broken)

"""The ``b3stream`` command: prepare, mine, train, evaluate, inspect, demo.

Each subcommand is a thin shell over a library function, so everything the CLI does can also be scripted.
The mining and training subcommands register their own arguments (``b3stream.mining.commands``,
``b3stream.train.commands``) to keep their flags next to the code they drive.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path

from . import __version__


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="turn a source into WebDataset shards with dense ids and a manifest",
        description="Write WebDataset shards + manifest.json. SOURCE is jsonl, csv, parquet (then give SRC), hf "
                    "(SRC: a Hugging Face datasets folder written by save_to_disk, or an .arrow file of one) or "
                    "codesearch (docstring -> code pairs from the installed Python packages).",
    )
    p.add_argument("source", choices=["jsonl", "csv", "parquet", "hf", "codesearch"])
    p.add_argument("src", nargs="?", help="source file or folder (not for codesearch)")
    p.add_argument("--hf-split", default=None,
                   help="hf: the split of a DatasetDict folder to read (default: train, or its only split)")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--format", default=None, choices=["flagembedding", "tevatron", "sentence-transformers"],
                   help="read another project's training files as they are: flagembedding {query, pos: [...], "
                        "neg: [...], prompt}; tevatron {query_id, query, positive_passages: [{docid, title, "
                        "text}], negative_passages}; sentence-transformers (anchor, positive[, negative | "
                        "negative_1..n]) columns by position. A field flag given with it replaces the preset's "
                        "column")
    p.add_argument("--query-field", default=None, help="column with the query text (default: query)")
    p.add_argument("--positive-field", default=None,
                   help="column with the positive: a text, or a list of texts or {title, text, docid} passages "
                        "(one example per positive, the others kept as its known positives; default: positive)")
    p.add_argument("--task-field", default=None, help="column naming the task (default: one task)")
    p.add_argument("--group-field", default=None,
                   help="column used to split held-out data by group (default: the query text)")
    p.add_argument("--negatives-field", default=None, type=_columns,
                   help="column with a list of hard-negative texts (or passages), or several columns of one "
                        "text each, comma-separated (negative_1,negative_2)")
    p.add_argument("--id-field", default=None,
                   help="column with the source's own row ids (checked unique; kept as source_id)")
    p.add_argument("--query-prompt-field", default=None,
                   help="column with a per-row query instruction; it replaces the task's query prompt")
    p.add_argument("--query-id-field", default=None, help="column with the source's query id (kept as query_id)")
    p.add_argument("--query-image-field", default=None, help="column with query image paths")
    p.add_argument("--positive-image-field", default=None, help="column with positive image paths")
    p.add_argument("--prompts", default=None, help="YAML: task -> {query: ..., positive: ...} instruction prompts")
    p.add_argument("--query-prompt", default="", help="default instruction prompt for queries")
    p.add_argument("--positive-prompt", default="", help="default instruction prompt for positives")
    p.add_argument("--test-fraction", type=_fraction, default=0.05, help="share of rows held out for test")
    p.add_argument("--validation-fraction", type=_fraction, default=0.05, help="share held out for validation")
    p.add_argument("--max-share", type=_share, default=0.2,
                   help="no task or group may exceed this share of a held-out split")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packages", default=None, help="codesearch: comma-separated tasks to keep (e.g. stdlib,numpy)")
    p.add_argument("--max-pairs", type=int, default=None, help="codesearch: stop after this many pairs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier dataset in --out (a folder holding only a manifest and its shards)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_prepare)


def _columns(text: str) -> str | list[str]:
    """One column name, or several separated by commas."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no column")
    return names[0] if len(names) == 1 else names


def _fraction(text: str) -> float:
    """A held-out fraction: at least 0, below 1."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1)")
    return value


def _share(text: str) -> float:
    """A share cap: above 0, at most 1."""
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share in (0, 1]")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _run_prepare(args) -> int:
    from .data.prepare import load_prompts, prepare_codesearch, prepare_file, print_summary
    from .data.sources import preset_fields

    common = dict(
        held_out={"validation": args.validation_fraction, "test": args.test_fraction},
        samples_per_shard=args.samples_per_shard, seed=args.seed, max_share=args.max_share,
        prompts=load_prompts(args.prompts, args.query_prompt, args.positive_prompt),
        overwrite=args.overwrite, progress=not args.quiet,
    )
    if args.source == "codesearch":
        if args.format:
            raise SystemExit("b3stream prepare: --format is for jsonl, csv, parquet and hf sources")
        packages = [p for p in args.packages.split(",") if p] if args.packages else None
        manifest = prepare_codesearch(args.out, packages=packages, max_pairs=args.max_pairs, **common)
    else:
        if not args.src:
            raise SystemExit(f"b3stream prepare {args.source}: give the source file")
        fields = preset_fields(
            args.format, query=args.query_field, positive=args.positive_field, task=args.task_field,
            group=args.group_field, negatives=args.negatives_field, id=args.id_field,
            query_image=args.query_image_field, positive_image=args.positive_image_field,
            query_prompt=args.query_prompt_field, query_id=args.query_id_field,
        )
        if args.hf_split and args.source != "hf":
            raise SystemExit("b3stream prepare: --hf-split is for `prepare hf` only")
        manifest = prepare_file(args.src, args.source, args.out, fields, hf_split=args.hf_split, **common)
    print_summary(manifest)
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a dataset folder or a schedule (batch quality)",
                       description="PATH is a prepared dataset folder, a schedule file (.b3s) or a folder of "
                                   "schedules. For schedules it prints the metadata and batch quality.")
    p.add_argument("path")
    p.add_argument("--verify", action="store_true", help="dataset: re-hash and re-read every shard")
    p.add_argument("--embeddings", default=None,
                   help="schedule: recompute batch quality with these embeddings (a mining folder)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    path = Path(args.path)
    if (path / "manifest.json").is_file():
        from .data.manifest import Manifest
        from .data.prepare import print_summary
        from .data.reader import ShardedDataset

        manifest = Manifest.load(path)
        print_summary(manifest)
        if args.verify:
            for split in manifest.splits:
                ShardedDataset(path, split, manifest=manifest).verify()
                print(f"  {split}: verified")
        return 0
    from .mining.commands import inspect_schedule

    return inspect_schedule(path, embeddings=args.embeddings)


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="end to end on the bundled model and code-search data",
                       description="prepare the code-search pairs, mine a B3 schedule with the bundled "
                                   "MiniLM teacher, train a LoRA student on it and evaluate before/after.")
    p.add_argument("--out", default=None, help="run folder (stages found there are reused; default runs/demo, "
                                               "runs/demo-refresh with --refresh)")
    p.add_argument("--max-pairs", type=int, default=None,
                   help="code-search pairs to prepare (default 6000; 1500 with --refresh, so that each of the "
                        "miner's re-embeddings takes a minute or two on a laptop CPU)")
    p.add_argument("--batch-size", type=int, default=32, help="|B|, the global batch")
    p.add_argument("--K", type=int, default=8, help="community size")
    p.add_argument("--p", type=int, default=3, help="ranks skipped (few thousand examples: keep it small)")
    p.add_argument("--m", type=int, default=50, help="ranks kept after the skip")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-queries", type=int, default=1000, help="held-out queries to evaluate on")
    p.add_argument("--refresh", action="store_true",
                   help="train in refreshed mode: a background miner re-mines the schedule from student snapshots")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    args.out = args.out or ("runs/demo-refresh" if args.refresh else "runs/demo")
    args.max_pairs = args.max_pairs or (1500 if args.refresh else 6000)

    return run_demo(args)


# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="b3stream",
        description="Contrastive embedding training with smart batch mining (B3 / B3++ / GCBS / random / task).",
    )
    parser.add_argument("--version", action="version", version=f"b3stream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_prepare(sub)
    from .mining.commands import register as register_mine
    from .train.commands import register as register_train

    from .refresh.miner import register as register_refresh

    register_mine(sub)
    register_train(sub)  # train, evaluate
    register_refresh(sub)
    _add_inspect(sub)
    _add_demo(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (the subcommands' too: ``add_parser`` makes its own class) whose :meth:`error` raises
    :class:`_ParseError` instead of exiting while ``hand_back`` is set (see :func:`parse_args`)."""

    hand_back = False

    def error(self, message):
        if self.hand_back:
            raise _ParseError(message)
        super().error(message)


class _ParseError(Exception):
    pass


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that a flag the subcommand does not know is reported by the subcommand.

    argparse hands a subcommand's unknown arguments back to the top-level parser, which then prints its own
    usage (``b3stream [-h] [--version] COMMAND ...``): no help for someone who mistyped a ``mine`` flag. And
    the value after a misspelt flag is taken for a positional argument, whose error hides the flag
    (``b3stream mine --Kk 4``: "argument stage: invalid choice: '4'"): when parsing fails and the subcommand's
    arguments hold flags it does not know, those flags are the error, with the closest known one.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no flag with a value
    sub = _subparsers(parser).get(command)
    strays = _unknown_flags(sub, argv[argv.index(command) + 1:]) if sub is not None else []
    if strays:
        sub.hand_back = True
    try:
        args, unknown = parser.parse_known_args(argv)
    except _ParseError:
        sub.hand_back = False
        sub.error("unrecognized arguments: " + " ".join(_with_hint(a, _option_strings(sub)) for a in strays))
    finally:
        if sub is not None:
            sub.hand_back = False
    if unknown:
        command = getattr(args, "command", None)
        # Blame the subcommand only for what came after its name (``b3stream --bogus mine`` is the top's).
        after_command = (command in argv and unknown[0] in argv
                         and argv.index(unknown[0]) > argv.index(command))
        owner = _subparsers(parser).get(command, parser) if after_command else parser
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")  # what argparse takes for a value, not a flag


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def _with_hint(arg: str, known: list[str]) -> str:
    close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1, cutoff=0.75)
    return f"{arg} (did you mean {close[0]}?)" if close else arg


def _unknown_flags(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """The arguments that argparse will take for flags and that are not ``parser``'s (nor abbreviations of
    them); erring on the side of none: it is argparse that parses."""
    known = _option_strings(parser)
    found = []
    for arg in args:
        if arg == "--":
            break
        if len(arg) < 2 or not arg.startswith("-") or " " in arg or _NEGATIVE_NUMBER.fullmatch(arg):
            continue
        name = arg.split("=", 1)[0]
        if any(s.startswith(name) for s in known) or (not arg.startswith("--") and arg[:2] in known):
            continue
        found.append(arg)
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(build_parser(), argv)
    from .config import ConfigError
    from .data.manifest import DataError
    from .schedule import ScheduleError

    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, ScheduleError) as e:
        print(f"b3stream {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

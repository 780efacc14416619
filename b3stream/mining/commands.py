"""`b3stream mine` and schedule inspection (filled in by the mining work)."""


def register(sub) -> None:
    p = sub.add_parser("mine", help="mine a batch schedule (not yet available)")
    p.set_defaults(func=lambda args: print("b3stream mine: not yet available") or 1)


def inspect_schedule(path, embeddings=None) -> int:
    print(f"{path}: schedule inspection not yet available")
    return 1

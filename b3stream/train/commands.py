"""`b3stream train` and `b3stream evaluate` (filled in by the training work)."""


def register(sub) -> None:
    for name in ("train", "evaluate"):
        p = sub.add_parser(name, help=f"{name} (not yet available)")
        p.set_defaults(func=lambda args: print("not yet available") or 1)

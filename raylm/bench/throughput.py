"""Placeholder: `raylm bench throughput` (being written)."""


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("throughput", help="offline throughput")
    add_engine_args(p)

"""`peer simulate`'s command-line options, apart from the simulator so that building the CLI parser imports
neither torch nor the algorithms (every `peer` command pays for what the parser imports)."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="local", choices=("local", "ray"), help="local (this process) or ray")
    p.add_argument("--peers", type=int, default=16, help="simulated peers (default 16)")
    p.add_argument(
        "--topology",
        default="exponential",
        help="ring | full | exponential | random-regular:K, or several separated by commas to compare them "
        "(default exponential)",
    )
    p.add_argument("--actors", type=int, default=4, help="peer groups: Ray actors, or groups in this process (4)")
    p.add_argument("--address", help="a Ray cluster's address (ray start --head prints it); default: a private Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of the private Ray instance (default: all)")
    p.add_argument("--object-store-mb", type=int, default=256, help="object store of the private Ray (256 MiB)")
    p.add_argument("--faults", metavar="SPEC", default="", help="as peer demo's, plus stragglers=F:FACTOR, churn=F:S")
    p.add_argument("--tol", type=float, default=1e-4, help="consensus: relative RMS disagreement (default 1e-4)")
    p.add_argument("--max-rounds", type=int, default=2000, help="mixing rounds after training at most (2000)")
    p.add_argument("--tick-ms", type=float, default=5.0, help="virtual milliseconds per tick (one hop; default 5)")
    p.add_argument("--seed", type=int, default=0, help="data, model, topology and fault seed (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")

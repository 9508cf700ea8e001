"""`hamengine bench ...`: the benchmarks. Each subcommand lives beside its library code in bench/."""
from __future__ import annotations

import click

from hamengine.cli import LazyGroup

BENCHES: dict[str, str] = {
    "pack": "hamengine.bench.pack:bench_pack",
    "loader": "hamengine.bench.loader:bench_loader",
    "train": "hamengine.bench.train:bench_train",
    "serve": "hamengine.bench.serve:bench_serve",
}


@click.group(cls=LazyGroup, lazy=BENCHES)
def bench() -> None:
    """Measure packing, loading, training and serving throughput. Results carry the hardware,
    versions and commit; quote ratios measured in the same run (see BENCHMARKS.md)."""

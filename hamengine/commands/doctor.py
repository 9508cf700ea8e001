"""`hamengine doctor`: what this machine can run."""
from __future__ import annotations

import click

from hamengine.commands.common import console, emit_json


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def doctor(as_json: bool) -> None:
    """Report Python, torch, torchvision and DALI versions, CUDA and the GPU, whether DALI CPU and GPU
    pipelines can be built here, and the CPU count."""
    from hamengine.engine.environment import doctor_report

    report = doctor_report()
    if as_json:
        emit_json(report)
        return
    from rich.table import Table

    table = Table(title="hamengine doctor", show_header=False)
    for key, value in report.items():
        shown = "[green]yes[/]" if value is True else "[red]no[/]" if value is False else str(value)
        table.add_row(key, "[dim]missing[/]" if value is None else shown)
    console.print(table)

"""`hamengine doctor`: what this machine can run, and how `auto` runs a model here."""
from __future__ import annotations

import click
from rich.table import Table

from hamengine.commands.common import console, emit_json


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--model", default="hamnet", show_default=True, help="Model whose training step the plan times.")
@click.option("--size", type=click.IntRange(32), default=128, show_default=True, help="Input side of the timed steps.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Batch of the timed steps.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def doctor(as_json: bool, model: str, size: int, batch_size: int, device: str) -> None:
    """Report Python, torch, torchvision and DALI versions, CUDA and the GPU, whether DALI CPU and GPU
    pipelines can be built here, the CPU count, and the execution plan `train` chooses on this host:
    the CPU's capability (native bf16 or not), training img/s of each candidate (fp32 / bf16 x NCHW /
    channels_last; measured once, then read from the cache) and the choice with its reason."""
    from hamengine.engine.runtime.environment import (  # lazy: torch (--help stays fast)
        doctor_report,
        execution_plan,
    )

    report = doctor_report()
    plan = execution_plan(model, size, batch_size, device)
    if as_json:
        emit_json({**report, "plan": plan})
        return

    table = Table(title="hamengine doctor", show_header=False)
    for key, value in report.items():
        shown = "[green]yes[/]" if value is True else "[red]no[/]" if value is False else str(value)
        table.add_row(key, "[dim]missing[/]" if value is None else shown)
    console.print(table)
    host = plan["plan"]
    title = f"execution plan: {model} {size} px, batch {batch_size}, {plan['device']}"
    if host.get("cpu_capability"):
        flags = ", ".join(f for f, on in host["cpu_flags"].items() if on) or "none"
        title += f" (capability {host['cpu_capability']}; flags {flags})"
    rates = Table(title=title)
    rates.add_column("candidate")
    rates.add_column("train img/s", justify="right")
    chosen = f"{'bf16' if plan['amp_dtype'] == 'bfloat16' else 'fp32'}/{'channels_last' if plan['channels_last'] else 'NCHW'}"
    for name, ips in sorted(host["probe_img_per_s"].items(), key=lambda kv: -kv[1]):
        rates.add_row(name + ("  [green]<- chosen[/]" if name == chosen else ""), f"{ips:,.0f}")
    if host["probe_img_per_s"]:
        console.print(rates)
    else:
        console.print(f"[bold]{title}[/]")
    for line in plan["lines"]:
        console.print(f"  {line}")
    if host.get("probe_cached") is not None:
        console.print(f"  [dim]({'from the cache' if host['probe_cached'] else 'measured now and cached'}: "
                      f"{plan['cache']})[/]")

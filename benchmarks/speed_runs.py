r"""The spread of ``step_speed.py``'s ratios over separate runs: one row per method, backbone
and batch size found in every run's ``--json`` file.

A run's ratio is already the median over its paired rounds; between runs that median moves by
more than its rounds spread (the machine's speed and other load; on the CPU machine of
benchmarks/README.md a ViT-Ti/16 step that runs at one of two speeds per process), so the table
gives, for eager and compiled PyTorch, the median of the runs' ratios and, in brackets, the
lowest and highest run's ratio; then jprompt's images/s as the median of the runs' and the
highest 1-minute load average seen in any round.

    for run in 1 2 3; do
      python benchmarks/step_speed.py --backbones=vit_ti16 --batch_sizes=16 --steps=1 \
          --repeats=8 --json=/tmp/speed_ti16_$run.json
    done
    python benchmarks/speed_runs.py /tmp/speed_ti16_*.json
"""

import json
import statistics
import sys


def rows_by_key(paths: list[str]) -> dict[tuple, list[dict]]:
    """(method, backbone, batch) -> that row of each run, for the keys every run has."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append({(r["method"], r["backbone"], r["batch"]): r for r in json.load(f)["rows"]})
    common = [key for key in runs[0] if all(key in run for run in runs)]
    return {key: [run[key] for run in runs] for key in common}


def spread(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(paths: list[str]) -> str:
    lines = [
        f"{len(paths)} runs: median (lowest-highest run)",
        "| method | backbone | batch | ratio eager | ratio compiled | jprompt img/s | max load |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (method, backbone, batch), rows in rows_by_key(paths).items():
        img_s = statistics.median(r["img_s"] for r in rows)
        loads = [load for r in rows for load in r.get("load") or []]
        max_load = f"{max(loads):.1f}" if loads else "-"
        lines.append(
            f"| {method} | {backbone} | {batch} | {spread([r['ratio'] for r in rows])} "
            f"| {spread([r['ratio_compiled'] for r in rows])} | {img_s:.2f} | {max_load} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/speed_runs.py RUN.json [RUN.json ...]")
    print(table(sys.argv[1:]))

r"""Collect a sweep's ``results.json`` files into a table, beside the papers' numbers.

    python -m jprompt.tools.tables /tmp/vtab_sweep                   # markdown
    python -m jprompt.tools.tables /tmp/vtab_sweep --format=csv
    python -m jprompt.tools.tables /tmp/vtab_sweep --test_selected   # + the optimistic column

One row per setting (a ``jprompt.tools.sweep`` run without its seed): top-1 accuracy in percent as
mean ± sample standard deviation (ddof=1) over its seeds, on the validation split and on the test
split. A row of CoOp's few-shot protocol (``shots=K``, its seeds the few-shot seeds 1, 2, 3) gives
the population standard deviation (ddof=0) instead, as CoOp's parse_test_res.py (``np.std``;
the CoOp paper prints the mean alone). Per method, dataset, backbone and shots the setting
with the best mean validation accuracy is marked ``selected``: the honest number.
``--test_selected`` adds, clearly labelled, the setting that is best on test (what the official
VP and PGN code report). A second table averages the selected test accuracies over each
benchmark group (VTAB natural / specialized / structured, FGVC; per number of shots) when the
sweep covers all its datasets, as VPT reports them.

A paper's number is printed beside a row only when every run of the row followed that paper's
protocol (``jprompt.train.protocols``: the protocol card in its results.json has no difference from
it); otherwise the paper column says which fields differ. Fewer seeds than the paper averages
are said beside the number.
"""

import argparse
import collections
import csv
import dataclasses
import io
import json
import pathlib
import statistics
import sys

from jprompt.data import presets
from jprompt.tools import paper_results
from jprompt.tools.sweep import RUN_FILE
from jprompt.train import protocols

RESULTS_FILE = "results.json"  # as jprompt.train.trainer writes it


@dataclasses.dataclass
class Row:
    method: str
    dataset: str
    backbone: str
    setting: str
    val: list[float]
    test: list[float]
    cards: list[dict | None] = dataclasses.field(default_factory=list)
    shots: int = 0  # CoOp's few-shot draw; 0: the full training split
    selected: bool = False
    test_selected: bool = False

    @property
    def key(self):
        return (self.method, self.dataset, self.backbone, self.shots)

    def format(self, values: list[float]) -> str:
        """``mean ± std`` of ``values``: ddof 0 for a few-shot row, as CoOp's, else 1."""
        mean, std = mean_std(values, ddof=0 if self.shots else 1)
        return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def mean_std(values: list[float], ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation with ``ddof`` 1 (sample) or 0 (population); 0 for one value."""
    if len(values) < 2:
        return statistics.fmean(values), 0.0
    std = statistics.stdev(values) if ddof else statistics.pstdev(values)
    return statistics.fmean(values), std


def collect(root) -> list[Row]:
    """Rows of every finished run under ``root``, seeds of one setting merged."""
    groups = {}
    for path in sorted(pathlib.Path(root).rglob(RESULTS_FILE)):
        results = json.loads(path.read_text())
        if "test" not in results:
            continue  # stopped early: no final evaluation yet
        run_file = path.parent / RUN_FILE
        if run_file.exists():
            run = json.loads(run_file.read_text())
            config = run["config"]
            overrides = {k: v for k, v in run["overrides"].items() if k != "seed"}
            # The few-shot seed is a seed: its runs are one setting.
            arg = [i for i in run["arg"].split(",") if not i.startswith("fewshot_seed=")]
            setting = ",".join(filter(None, arg + [f"{k}={v}" for k, v in overrides.items()]))
            method, dataset = paper_results.method_label(config), config["dataset"]["preset"]
            shots = config["dataset"].get("shots", 0)  # run.json files from before few-shot
        else:  # a run made without jprompt.tools.sweep: its directory names the setting
            setting = str(path.parent.parent.relative_to(root))
            method, dataset = results["method"], results["dataset"]
            shots = (results.get("protocol", {}).get("card") or {}).get("dataset.shots", 0)
        key = (method, dataset, results["backbone"], setting)
        row = groups.setdefault(key, Row(*key, val=[], test=[], shots=shots))
        row.val.append(100 * results["val"]["accuracy"])
        row.test.append(100 * results["test"]["accuracy"])
        row.cards.append(results.get("protocol", {}).get("card"))
    rows = list(groups.values())
    by_key = collections.defaultdict(list)
    for row in rows:
        by_key[row.key].append(row)
    for candidates in by_key.values():
        max(candidates, key=lambda r: mean_std(r.val)[0]).selected = True
        max(candidates, key=lambda r: mean_std(r.test)[0]).test_selected = True
    return rows


SHOWN_DIFFERENCES = 3  # fields named in a refusal; the run's results.json has them all


def not_comparable(rows: list[Row], protocol: str) -> str:
    """Why ``rows`` cannot stand beside a number of ``protocol``'s paper ("" if they can)."""
    for row in rows:
        if any(card is None for card in row.cards):
            return f"{row.dataset}: a run without a protocol card (made before protocols)"
        for card in row.cards:
            differences = protocols.differences(card, protocol)
            if differences:
                fields = [d.split(":")[0] for d in differences]
                more = len(fields) - SHOWN_DIFFERENCES
                shown = ", ".join(fields[:SHOWN_DIFFERENCES]) + (f" +{more}" if more > 0 else "")
                return f"{row.dataset}: not the {protocol} protocol ({shown})"
    return ""


def _paper(method: str, benchmark: str, rows: list[Row]) -> str:
    """The paper's number for ``rows`` (one row, or a group's), or why it is not shown."""
    result = paper_results.lookup(method, benchmark)
    if not result:
        return ""
    refusal = not_comparable(rows, result.protocol)
    if refusal:
        return f"not comparable: {refusal}"
    seeds = min(len(r.test) for r in rows)
    wanted = protocols.get(result.protocol).seeds
    few = f"; {seeds} of the paper's {wanted} seeds" if seeds < wanted else ""
    return f"{result.accuracy:.2f} ({result.source}{few})"


def run_table(rows: list[Row], test_selected: bool) -> list[list[str]]:
    header = ["method", "dataset", "backbone", "setting", "seeds", "val", "test", "selected"]
    if test_selected:
        header.append("best on test (optimistic)")
    table = [header + ["paper"]]
    for r in sorted(rows, key=lambda r: (r.dataset, r.method, r.backbone, r.setting)):
        line = [r.method, r.dataset, r.backbone, r.setting or "default", str(len(r.test))]
        line += [r.format(r.val), r.format(r.test), "yes" if r.selected else ""]
        if test_selected:
            line.append("yes" if r.test_selected else "")
        table.append(line + [_paper(r.method, r.dataset, [r])])
    return table


def group_table(rows: list[Row]) -> list[list[str]]:
    """Mean selected test accuracy per benchmark group, for groups a sweep covers fully."""
    table = [["method", "benchmark", "backbone", "datasets", "mean test", "paper"]]
    members = collections.defaultdict(set)
    for preset in presets.PRESETS.values():
        members[preset.group].add(preset.name)
    selected = collections.defaultdict(dict)
    for r in rows:
        if r.selected and r.dataset in presets.PRESETS:
            group = presets.PRESETS[r.dataset].group
            selected[(r.method, group, r.backbone, r.shots)][r.dataset] = r
    for (method, group, backbone, shots), by_dataset in sorted(selected.items()):
        if group in ("vp", "demo") or set(by_dataset) != members[group]:
            continue  # VP/PGN report datasets one by one; a partial group has no mean
        mean = statistics.fmean(mean_std(r.test)[0] for r in by_dataset.values())
        benchmark = f"{group}, {shots}-shot" if shots else group
        table.append([method, benchmark, backbone, str(len(by_dataset)), f"{mean:.2f}"])
        table[-1].append(_paper(method, group, list(by_dataset.values())))
    return table if len(table) > 1 else []


def render(table: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(table)
        return out.getvalue()
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(line) + " |" for line in table[1:]]
    return "\n".join(lines) + "\n"


FORMATS = ("markdown", "csv")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="directory of a sweep (searched recursively)")
    parser.add_argument("--format", default="markdown", help=f"one of {FORMATS}")
    parser.add_argument("--test_selected", action="store_true", help="add the optimistic column")
    args = parser.parse_args(argv)
    if args.format not in FORMATS:
        raise SystemExit(f"unknown format {args.format!r}; valid choices: {list(FORMATS)}")
    rows = collect(args.root)
    if not rows:
        raise SystemExit(f"no finished run (a {RESULTS_FILE} with test results) under {args.root}")
    text = render(run_table(rows, args.test_selected), args.format)
    groups = group_table(rows)
    if groups:
        text += "\n" + render(groups, args.format)
    print(text, end="")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])

"""Renders the tables and figure sentences of ``benchmarks/results/README.md`` from the JSON records beside it.

Every block of the README between ``<!-- table: NAME -->`` (or ``<!-- text: NAME -->`` for a sentence or list)
and ``<!-- /table -->`` (``<!-- /text -->``) is the output of the function registered here under NAME, which
names the JSON files it reads; the prose around the blocks carries no figure of its own. Formatting is fixed
(decimals rounded half up from the value as the JSON writes it), so rendering twice gives the same bytes.

    python benchmarks/render_results.py           # rewrite the README in place (atomically)
    python benchmarks/render_results.py --check   # exit 1 and print a diff when the README is stale

To add a table: write one function decorated with ``@renders("name", "record.json", ...)`` that returns the
Markdown, and put ``<!-- table: name -->`` / ``<!-- /table -->`` where it belongs in the README. The file is
longer than the house's ~400 lines because it holds one small renderer per table of that README.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from edgead.metrics import auroc_standard_error, rank_correlation

RESULTS = Path(__file__).resolve().parent / "results"
README = RESULTS / "README.md"
BLOCK = re.compile(r"<!-- (table|text): ([\w-]+) -->\n.*?<!-- /\1 -->", re.S)
OPENING = re.compile(r"<!-- (?:table|text): [\w-]+ -->\n")

Record = dict[str, Any]


@dataclass(frozen=True)
class Renderer:
    """One README block: the JSON files it reads (passed to ``render`` in this order) and how it writes them."""

    name: str
    files: tuple[str, ...]
    render: Callable[..., str]


RENDERERS: dict[str, Renderer] = {}


def renders(name: str, *files: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Registers the decorated function as the renderer of the README block ``name``."""

    def register(fn: Callable[..., str]) -> Callable[..., str]:
        if name in RENDERERS:
            raise ValueError(f"two renderers for the block {name!r}")
        RENDERERS[name] = Renderer(name, files, fn)
        return fn

    return register


# Formatting: the one place decimals are decided.


def num(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` fixed decimals, rounded half up on its shortest repr (0.9425 -> 0.943)."""
    quantum = Decimal(1).scaleb(-decimals)
    return str(Decimal(repr(float(value))).quantize(quantum, rounding=ROUND_HALF_UP))


def auroc(value: float) -> str:
    return num(value, 3)


def ms(seconds: float) -> str:
    return num(1000 * seconds, 0)


def ratio(value: float, decimals: int = 2) -> str:
    return f"{num(value, decimals)}x"


def percent(part: float, whole: float) -> str:
    return f"{num(100 * part / whole, 0)} %"


def span(values: Sequence[float], fmt: Callable[[float], str] = auroc) -> str:
    return f"{fmt(min(values))}-{fmt(max(values))}"


def triple(metrics: Record) -> str:
    """image AUROC / pixel AUROC / AUPRO."""
    return " / ".join(auroc(metrics[k]) for k in ("image_auroc", "pixel_auroc", "aupro"))


MARKDOWN_START = re.compile(r"(?:[-+*]|#+|>|\d+[.)])$")


def wrap(text: str, width: int = 110) -> str:
    """Text lines (and ``- `` list items, continued with two spaces) filled to the README's width; a word that
    Markdown would read as a list, heading or quote marker never starts a continuation line."""
    lines = []
    for line in text.split("\n"):
        indent, current = ("  " if line.startswith("- ") else ""), ""
        for word in line.split(" "):
            if current and len(current) + 1 + len(word) > width and not MARKDOWN_START.match(word):
                lines.append(current)
                current = indent + word
            else:
                current = f"{current} {word}" if current else word
        lines.append(current)
    return "\n".join(lines)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def date(record: Record) -> str:
    return record["machine"]["date"]


def gray_or_rgb(record: Record) -> str:
    size = record["image_size"]
    return f"{size}x{size} {'gray' if record['channels'] == 1 else 'RGB'}"


# Accuracy and latency of the score-based methods.


@renders("score-resilience-accuracy", "accuracy_score-resilience_magnetic_tile_tiny.json")
def score_resilience_accuracy(r: Record) -> str:
    m = r["metrics"]
    header = ["preset", "input", "steps", "training time", "image AUROC", "pixel AUROC", "AUPRO", "image AP"]
    row = [r["preset"], gray_or_rgb(r), r["train"]["steps"], f"{num(r['train']['train_seconds'], 0)} s"]
    row += [auroc(m[k]) for k in ("image_auroc", "pixel_auroc", "aupro", "image_ap")]
    return table([*header, "pixel AP"], [[*row, auroc(m["pixel_ap"])]])


@renders(
    "score-methods-accuracy",
    "accuracy_score-tscale_magnetic_tile_tiny.json",
    "accuracy_score-resilience_magnetic_tile_tiny.json",
)
def score_methods_accuracy(*records: Record) -> str:
    rows = [
        [r["method"], triple(r["metrics"]), f"{num(r['train']['train_seconds'], 0)} s"]
        + [ms(r["inference_seconds_per_image"]), date(r)]
        for r in records
    ]
    header = ["method", "image / pixel AUROC / AUPRO", "training time", "PyTorch ms/image (batch 8)", "date"]
    return table(header, rows)


@renders("score-tscale-features", "accuracy_score-tscale_magnetic_tile_tiny.json")
def score_tscale_features(r: Record) -> str:
    chosen = r["train"]["feature_selection_auroc"]
    return (
        f"score-tscale's automatic selection kept `{', '.join(r['train']['feature_maps'])}`, which reached image /"
        f" pixel AUROC {auroc(chosen['image_auroc'])} / {auroc(chosen['pixel_auroc'])} on the pseudo-anomalies,"
        f" against {auroc(r['metrics']['image_auroc'])} / {auroc(r['metrics']['pixel_auroc'])} on the test set."
    )


def _latency_row(r: Record) -> list[str]:
    stages = r["backend"]["stages"]
    return [
        num(stages["infer"]["median"], 1),
        num(stages["total"]["median"], 1),
        num(r["torch_eager"][0]["stats"]["median"], 1),
        ratio(r["speedup_vs_torch_eager_fp32"]),
    ]


@renders(
    "score-methods-latency",
    "latency_cpu_score-tscale_magnetic_tile_tiny_128.json",
    "latency_cpu_score-resilience_magnetic_tile_tiny_128.json",
)
def score_methods_latency(*records: Record) -> str:
    header = ["method", "ONNX Runtime graph ms", "ONNX Runtime `predict` ms", "PyTorch eager ms"]
    header += ["PyTorch / ONNX Runtime", "runtime RSS without torch", "camera loop FPS", "date"]
    rows = [
        [r["method"], *_latency_row(r), f"{num(r['runtime_process_without_torch']['memory']['rss_mb'], 0)} MB"]
        + [num(r["camera_loop"]["fps"], 1), date(r)]
        for r in records
    ]
    return table(header, rows)


@renders(
    "score-methods-cost",
    "accuracy_score-tscale_magnetic_tile_tiny.json",
    "latency_cpu_score-tscale_magnetic_tile_tiny_128.json",
    "latency_cpu_score-resilience_magnetic_tile_tiny_128.json",
)
def score_methods_cost(tscale_accuracy: Record, tscale: Record, resilience: Record) -> str:
    calls = tscale_accuracy["train"]["network_calls_per_image"]
    draws = resilience["method_params"]["n_draws"]
    graph = [r["backend"]["stages"]["infer"]["median"] for r in (tscale, resilience)]
    return (
        f"score-tscale runs the network on {calls['sample_evaluations']} samples per image in"
        f" {calls['batched_calls']} calls, {calls['calls']}; score-resilience on {draws}, in one call of batch"
        f" {draws}. Its graph takes {ratio(graph[0] / graph[1], 1)}"
        f" score-resilience's time per image here ({num(graph[0], 1)} vs {num(graph[1], 1)} ms) for"
        f" {ratio(calls['sample_evaluations'] / draws, 0)} the sample evaluations."
    )


# gaussian: defaults, factors, OPCA ablation, latency.

DATASETS = ("magnetic_tile", "bsdata")


@renders(
    "gaussian-defaults",
    "accuracy_gaussian_magnetic_tile_defaults.json",
    "accuracy_gaussian_bsdata_defaults.json",
)
def gaussian_defaults(*records: Record) -> str:
    header = ["dataset", "chosen OPCA fraction", "image AUROC", "pixel AUROC", "AUPRO", "fit time (incl. choice)"]
    rows = [
        [r["dataset"], r["train"]["opca_selection"]["selected"], *_metric_cells(r["metrics"])]
        + [f"{num(r['train']['fit_seconds'], 1)} s", f"{ms(r['inference_seconds_per_image'])} ms", date(r)]
        for r in records
    ]
    return table([*header, "PyTorch ms/image", "date"], rows)


def _metric_cells(metrics: Record) -> list[str]:
    return [auroc(metrics[k]) for k in ("image_auroc", "pixel_auroc", "aupro")]


@renders(
    "gaussian-defaults-before",
    "accuracy_gaussian_magnetic_tile_opca.json",
    "accuracy_gaussian_bsdata_opca.json",
    "accuracy_gaussian_magnetic_tile_defaults.json",
    "accuracy_gaussian_bsdata_defaults.json",
)
def gaussian_defaults_before(*records: Record) -> str:
    before, after = records[:2], records[2:]
    pairs = [
        f"{b['dataset']} {auroc(b['metrics']['image_auroc'])} -> {auroc(a['metrics']['image_auroc'])}"
        for b, a in zip(before, after, strict=True)
    ]
    return (
        f"Image AUROC from the paper's settings (the OPCA ablation table below) to these defaults: {'; '.join(pairs)}."
    )


FACTOR_KEYS = {
    "norm": "norm (pooled score)",
    "size": "size (pooled score)",
    "stages": "stages (pooled score)",
    "fraction": "fraction (pooled score)",
    "image score": "image score (default setting)",
    "all": "all candidates",
}


def _factor_label(factor: str, record: Record) -> str:
    grid, entry = record["grid"], record["pseudo_validation_vs_test"][FACTOR_KEYS[factor]]
    return {
        "norm": "input scaling (ImageNet vs [-1, 1])",
        "size": f"image size ({', '.join(str(s) for s in grid['size'])})",
        "stages": f"stage set ({entry['n']} sets)",
        "fraction": f"OPCA fraction ({min(grid['fraction'])}-{max(grid['fraction'])})",
        "image score": "image score (pooled, map max, map top-1 %, pooled + map top-1 %)",
        "all": f"all {entry['n']} candidates",
    }[factor]


def factor_table(factors: Sequence[str], records: Sequence[Record]) -> str:
    """Per factor and data set: Spearman of pseudo-validation vs test AUROC, picked / best test AUROC."""
    rows = []
    for factor in factors:
        labels = {_factor_label(factor, r) for r in records}
        if len(labels) != 1:
            raise ValueError(f"the records vary {factor!r} differently: {sorted(labels)}")
        cells = []
        for r in records:
            e = r["pseudo_validation_vs_test"][FACTOR_KEYS[factor]]
            cells.append(f"{num(e['spearman'], 2)}, {auroc(e['picked_test'])} / {auroc(e['best_test'])}")
        rows.append([labels.pop(), *cells])
    header = ["factor"] + [f"{r['dataset']}: Spearman, picked / best test" for r in records]
    return table(header, rows)


@renders("gaussian-factors", "gaussian_factors_magnetic_tile.json", "gaussian_factors_bsdata.json")
def gaussian_factors(*records: Record) -> str:
    return factor_table(["norm", "size", "stages", "fraction", "image score", "all"], records)


@renders(
    "gaussian-inspection-kinds-pseudo",
    "gaussian_factors_magnetic_tile_inspection_kinds.json",
    "gaussian_factors_bsdata_inspection_kinds.json",
    "gaussian_factors_magnetic_tile.json",
    "gaussian_factors_bsdata.json",
)
def gaussian_inspection_kinds_pseudo(*records: Record) -> str:
    kinds, paste = records[:2], records[2:]
    parts = [
        f"{k['dataset']} {auroc(_row(k, k['default'])['pseudo_val']['pooled'])}"
        f" (pasted fragments only: {auroc(_row(p, k['default'])['pseudo_val']['pooled'])})"
        for k, p in zip(kinds, paste, strict=True)
    ]
    return (
        f"With the kinds `{', '.join(kinds[0]['pseudo_kinds'])}`, pseudo-validation is harder: pooled image AUROC"
        f" of the base setting {', '.join(parts)}. The rankings:"
    )


def _row(record: Record, setting: Record) -> Record:
    return next(row for row in record["rows"] if row["setting"] == setting)


@renders(
    "gaussian-inspection-kinds",
    "gaussian_factors_magnetic_tile_inspection_kinds.json",
    "gaussian_factors_bsdata_inspection_kinds.json",
)
def gaussian_inspection_kinds(*records: Record) -> str:
    return factor_table(["norm", "fraction", "image score", "all"], records)


LETTERBOX = (
    "gaussian_factors_magnetic_tile_letterbox.json",
    "gaussian_factors_bsdata_letterbox.json",
    "gaussian_factors_magnetic_tile.json",
    "gaussian_factors_bsdata.json",
)


def _letterbox_pairs(*records: Record) -> list[tuple[str, float, float, float]]:
    """(data set, OPCA fraction, letterbox test pooled AUROC, squashed test pooled AUROC) per fraction."""
    pairs = []
    for boxed, squashed in zip(records[:2], records[2:], strict=True):
        for row in sorted(boxed["rows"], key=lambda row: row["setting"]["fraction"]):
            other = _row(squashed, row["setting"])
            pairs.append((boxed["dataset"], row["setting"]["fraction"], row["test"]["pooled"], other["test"]["pooled"]))
    return pairs


@renders("gaussian-letterbox", *LETTERBOX)
def gaussian_letterbox(*records: Record) -> str:
    rows = [[d, f, auroc(boxed), auroc(squashed)] for d, f, boxed, squashed in _letterbox_pairs(*records)]
    header = ["data set", "OPCA fraction", "letterbox: test pooled image AUROC", "squashed (same setting)"]
    return table(header, rows)


@renders("gaussian-letterbox-reading", *LETTERBOX)
def gaussian_letterbox_reading(*records: Record) -> str:
    pairs = _letterbox_pairs(*records)
    parts = []
    for dataset in dict.fromkeys(d for d, *_ in pairs):
        mine = [(b, s) for d, _, b, s in pairs if d == dataset]
        parts.append(f"{sum(b < s for b, s in mine)} of {len(mine)} fractions on {dataset}")
    return f"Letterboxing scores below squashing at {' and '.join(parts)}."


@renders("image-score-map", "image_score_score-resilience_magnetic_tile.json")
def image_score_map(r: Record) -> str:
    maps = {(row["test"]["pixel_auroc"], row["test"]["aupro"]) for row in r["rows"]}
    pixel, aupro = maps.pop()
    same = "is the same for every image score" if not maps else "differs between the image scores"
    return (
        f"One training run ({r['run_params']['n_draws']} draws, {r['train']['steps']} steps,"
        f" {num(r['train']['train_seconds'], 0)} s); the anomaly map, and so pixel AUROC {auroc(pixel)} and"
        f" AUPRO {auroc(aupro)}, {same}."
    )


@renders("image-score", "image_score_score-resilience_magnetic_tile.json")
def image_score(r: Record) -> str:
    p = r["run_params"]
    notes = {
        "max": "(the paper)",
        "topk_mean": f"(top {num(100 * p['topk_fraction'], 2)} %)",
        "interior_max": f"(border {Fraction(p['border_fraction']).limit_denominator(1000)})",
    }
    rows = [
        [f"{row['image_score']} {notes.get(row['image_score'], '')}".strip()]
        + [auroc(row["test"]["image_auroc"]), auroc(row["pseudo_validation"]["image_auroc"])]
        for row in r["rows"]
    ]
    return table(["image_score", "test image AUROC", "pseudo-validation image AUROC"], rows)


PROJECTIONS = ("opca", "pca", "none")


@renders(
    "gaussian-projection",
    *(f"accuracy_gaussian_{d}_{p}.json" for d in DATASETS for p in PROJECTIONS),
)
def gaussian_projection(*records: Record) -> str:
    header = ["dataset", "projection", "image AUROC", "pixel AUROC", "AUPRO", "fit time", "PyTorch ms/image", "date"]
    rows = [
        [r["dataset"], r["method_params"]["projection"], *_metric_cells(r["metrics"])]
        + [f"{num(r['train']['fit_seconds'], 1)} s", f"{ms(r['inference_seconds_per_image'])} ms", date(r)]
        for r in records
    ]
    return table(header, rows)


@renders(
    "gaussian-map-statistics",
    *(f"accuracy_gaussian_{d}_{tag}.json" for d in DATASETS for tag in ("opca", "opca_pooled")),
)
def gaussian_map_statistics(*records: Record) -> str:
    rows = [
        [r["dataset"], r["method_params"].get("map_statistics", "positions (then the default)")]
        + [*_metric_cells(r["metrics"]), date(r)]
        for r in records
    ]
    return table(["dataset", "map statistics", "image AUROC", "pixel AUROC", "AUPRO", "date"], rows)


GAUSSIAN_LATENCY = (
    *(f"latency_cpu_gaussian_{d}_{p}.json" for d in DATASETS for p in PROJECTIONS),
    "latency_cpu_gaussian_magnetic_tile_defaults.json",
)


@renders("gaussian-latency", *GAUSSIAN_LATENCY)
def gaussian_latency(*records: Record) -> str:
    rows = []
    for r in records:
        dataset, _, tag = r["machine"]["command"].split("--tag gaussian_")[1].split()[0].rpartition("_")
        if tag == "defaults":
            p = r["method_params"]
            scaling = "[-1, 1]" if p["input_scaling"] == "inception" else p["input_scaling"]
            tag = f"defaults (OPCA auto -> {p['opca_fraction']}, {scaling} scaling)"
        rows.append([dataset, tag, *_latency_row(r), r["device"], date(r)])
    header = ["dataset", "projection", "ONNX Runtime graph ms", "ONNX Runtime `predict` ms", "PyTorch eager ms"]
    return table([*header, "PyTorch / ONNX Runtime (graph)", "CPU", "date"], rows)


@renders("gaussian-latency-memory", *GAUSSIAN_LATENCY)
def gaussian_latency_memory(*records: Record) -> str:
    rss = [r["runtime_process_without_torch"]["memory"]["rss_mb"] for r in records]
    return f"A runtime process that never imports torch holds {span(rss, lambda v: num(v, 0))} MB resident."


@renders(
    "gaussian-defaults-latency",
    "latency_cpu_gaussian_magnetic_tile_opca.json",
    "latency_cpu_gaussian_magnetic_tile_defaults.json",
)
def gaussian_defaults_latency(before: Record, after: Record) -> str:
    b, a = before["backend"]["stages"], after["backend"]["stages"]

    def change(stage: str) -> float:
        return a[stage]["median"] / b[stage]["median"] - 1

    def signed(value: float) -> str:
        return f"{'+' if value >= 0 else ''}{num(100 * value, 0)} %"

    within = all(abs(change(stage)) <= a[stage]["cv"] for stage in ("infer", "total"))
    days = (
        dt.date.fromisoformat(after["machine"]["date"][:10]) - dt.date.fromisoformat(before["machine"]["date"][:10])
    ).days
    cpus = f"the same CPU model ({after['device']})" if before["device"] == after["device"] else (
        f"different CPUs ({before['device']} vs {after['device']})")  # fmt: skip
    return (
        f"Against the magnetic_tile opca row: graph {signed(change('infer'))}, `predict` {signed(change('total'))}."
        f" The rows were measured {days} days apart on {cpus} of a shared machine, and the defaults run's"
        f" own coefficient of variation is {num(a['infer']['cv'], 2)} for the graph and {num(a['total']['cv'], 2)}"
        f" for `predict`, so the difference is {'within' if within else 'larger than'} its spread; the operations"
        " are the same, so a difference beyond the spread is the machine's, not the defaults'."
    )


@renders("small-192-latency", "latency_cpu_small_192_n3.json")
def small_192_latency(r: Record) -> str:
    stages, eager = r["backend"]["stages"], r["torch_eager"][0]["stats"]
    rows = [
        ("ONNX Runtime, graph only (`infer`)", stages["infer"]),
        ("ONNX Runtime, whole `predict` (720p frame in)", stages["total"]),
        ("PyTorch eager, same graph, same batch", eager),
    ]
    cells = [[what, *(num(s[k], 1) for k in ("median", "p90", "p99")), num(s["cv"], 2), s["n"]] for what, s in rows]
    return table(["what", "median ms", "p90 ms", "p99 ms", "CV", "runs"], cells)


@renders("small-192-summary", "latency_cpu_small_192_n3.json")
def small_192_summary(r: Record) -> str:
    loop = r["camera_loop"]
    return "\n".join(
        [
            f"- ONNX Runtime vs PyTorch eager (graph only): {ratio(r['speedup_vs_torch_eager_fp32'])} faster.",
            "- Resident memory of a runtime process that never loads torch (ONNX Runtime backend, model loaded and"
            f" run): {num(r['runtime_process_without_torch']['memory']['rss_mb'], 0)} MB; the benchmark process"
            f" with torch loaded: {num(r['memory_after_backend']['rss_mb'], 0)} MB.",
            f"- Camera loop on a video file (capture thread, queue, predict): {num(loop['fps'], 2)} FPS vs bare"
            f" `predict` {num(loop['bare_inference_fps'], 2)} FPS (ratio {num(loop['ratio_to_bare'], 2)}).",
        ]
    )


# lafite.

LAFITE = ("lafite_magnetic_tile.json", "lafite_bsdata.json")


def _training(train: Record) -> str:
    stopped = "" if train["reached_target_steps"] else " (time limit)"
    return f"{train['steps']}{stopped}, {num(train['train_seconds'], 0)} s"


@renders("lafite-accuracy", *LAFITE, "lafite_magnetic_tile+bsdata_unified.json")
def lafite_accuracy(*records: Record) -> str:
    rows = []
    for r in records:
        chosen = f"{r['selection']['chosen']['tau']}, {r['selection']['chosen']['k']}"
        for dataset in r["datasets"]:
            res = r["results"][dataset]
            best = "-"
            if "tau_sweep" in res:
                best = f"{res['tau_sweep']['agreement']['best_on_test']}, {res['k_sweep']['agreement']['best_on_test']}"
            label = dataset if len(r["datasets"]) == 1 else f"one unified model, {dataset}"
            rows.append(
                [label, *_metric_cells(res["lafite"]), triple(res["lafite_without_editing"]), chosen, best]
                + [_training(r["train"])]
            )
    header = ["data set", "image AUROC", "pixel AUROC", "AUPRO", "w/o feature editing (image / pixel / AUPRO)"]
    return table([*header, "tau, K chosen", "best tau, K on test", "training steps, time"], rows)


@renders("lafite-ddim-steps", *LAFITE, "latency_cpu_lafite_magnetic_tile.json")
def lafite_ddim_steps(mt: Record, bs: Record, latency: Record) -> str:
    rows = []
    for steps in mt["results"]["magnetic_tile"]["ddim_steps"]:
        lat = latency["rows"][f"lafite_{steps}_steps"]
        rows.append(
            [steps, triple(mt["results"]["magnetic_tile"]["ddim_steps"][steps])]
            + [triple(bs["results"]["bsdata"]["ddim_steps"][steps]), num(lat["onnxruntime_infer_median_ms"], 1)]
            + [num(lat["onnxruntime_predict_median_ms"], 1), ratio(lat["vs_gaussian_graph"])]
            + [ratio(lat["speedup_vs_torch_eager"])]
        )
    g = latency["rows"]["gaussian"]
    rows.append(
        ["gaussian (baseline)", "-", "-", num(g["onnxruntime_infer_median_ms"], 1)]
        + [
            num(g["onnxruntime_predict_median_ms"], 1),
            ratio(g["vs_gaussian_graph"]),
            ratio(g["speedup_vs_torch_eager"]),
        ]
    )
    header = ["DDIM steps", "magnetic_tile image / pixel AUROC / AUPRO", "bsdata image / pixel AUROC / AUPRO"]
    header += ["ONNX Runtime graph ms", "ONNX Runtime `predict` ms", "x gaussian graph", "PyTorch / ONNX Runtime"]
    return table(header, rows)


@renders("lafite-ddim-reading", *LAFITE)
def lafite_ddim_reading(*records: Record) -> str:
    parts = []
    for r in records:
        (dataset,) = r["datasets"]
        steps = r["results"][dataset]["ddim_steps"]
        image = [v["image_auroc"] for v in steps.values()]
        parts.append(
            f"{span(image)} on {dataset} ({auroc(steps[min(steps, key=int)]['image_auroc'])} at"
            f" {min(steps, key=int)} step, {auroc(steps[max(steps, key=int)]['image_auroc'])} at"
            f" {max(steps, key=int)})"
        )
    return f"Across the DDIM step counts image AUROC spans {' and '.join(parts)}."


@renders("lafite-sweeps", *LAFITE)
def lafite_sweeps(*records: Record) -> str:
    rows = []
    for r in records:
        (dataset,) = r["datasets"]
        res, chosen = r["results"][dataset], r["selection"]["chosen"]
        sweeps = (("tau", "tau_sweep", "feature editing off"), ("K", "k_sweep", f"tau = {chosen['tau']}"))
        for name, key, condition in sweeps:
            sweep = res[key]
            for candidate, test in sweep["test"].items():
                rows.append(
                    [dataset, f"{name} = {candidate} ({condition})", auroc(sweep["pseudo"][candidate]["image_auroc"])]
                    + [auroc(test["image_auroc"]), auroc(test["pixel_auroc"])]
                )
            rows[-len(sweep["test"])][0] += f" (Spearman {num(sweep['agreement']['spearman'], 2)})"
    header = ["data set", "candidate", "pseudo-validation image AUROC", "test image AUROC"]
    return table([*header, "test pixel AUROC, defective images only"], rows)


LAFITE_SELECTION = ("lafite_magnetic_tile_selection.json", "lafite_bsdata_selection.json")


@renders("lafite-selection-runs", *LAFITE_SELECTION)
def lafite_selection_runs(*records: Record) -> str:
    rows = []
    for r in records:
        (dataset,) = r["datasets"]
        s, res = r["selection"], r["results"][dataset]
        rule, agree = s["edit_rule"], res["k_sweep"]["agreement"]["all"]
        best = "{}, K = {}".format(*rule["best"])
        margin = f"+{num(rule['margin'], 3)} vs {num(rule['standard_error'], 3)}" if "margin" in rule else "-"
        chosen = f"{s['chosen']['edit_weighting']}, K = {s['chosen']['k']}"
        rows.append(
            [dataset, _training(r["train"]), s["chosen"]["tau"], chosen]
            + [best, margin, auroc(res["lafite"]["image_auroc"]), agree["best_on_test"].replace("/", ", K = ")]
            + [auroc(agree["best_test_image_auroc"]), num(agree["spearman"], 2)]
        )
    header = ["data set", "training steps, time", "tau chosen", "weighting, K chosen", "best on pseudo-validation"]
    header += ["its margin vs one standard error", "test image AUROC (chosen)", "best on test", "its test image AUROC"]
    return table([*header, "Spearman, pseudo vs test, 14 candidates"], rows)


@renders("lafite-selection", *LAFITE_SELECTION)
def lafite_selection(*records: Record) -> str:
    rows = []
    for r in records:
        (dataset,) = r["datasets"]
        pseudo, test = r["selection"]["k"], r["results"][dataset]["k_sweep"]["test"]
        chosen = (r["selection"]["chosen"]["edit_weighting"], str(r["selection"]["chosen"]["k"]))
        for weighting, rows_k in pseudo.items():
            for k, row in rows_k.items():
                mark = " (chosen)" if (weighting, k) == chosen else ""
                rows.append(
                    [dataset, weighting, f"{k}{mark}", auroc(row["image_auroc"]), auroc(row["pixel_auroc"])]
                    + [auroc(test[weighting][k]["image_auroc"]), auroc(test[weighting][k]["pixel_auroc"])]
                )
    header = ["data set", "weighting", "K", "pseudo-validation image AUROC", "pseudo-validation pixel AUROC"]
    return table([*header, "test image AUROC", "test pixel AUROC, defective images only"], rows)


# Issue 24: the discriminating pseudo-validation, per-position statistics, calibrated maps, fusion.

CHOICES = ("choices_gaussian_magnetic_tile_defaults.json", "choices_gaussian_bsdata_defaults.json")


def _pseudo(row: Any) -> tuple[str, str]:
    if isinstance(row, dict):
        return auroc(row["image_auroc"]), auroc(row["pixel_auroc"]) if "pixel_auroc" in row else "-"
    return auroc(row), "-"


@renders("choices-defaults", *CHOICES)
def choices_defaults(*records: Record) -> str:
    rows = []
    for r in records:
        t, p = r["defaults_test"], r["method_params_resolved"]
        chosen = ", ".join(f"{k} = {p[k]}" for k in r["choices"])
        rows.append([r["dataset"], r["image_size"], chosen, auroc(t["image_auroc"]), auroc(t["pixel_auroc"])])
        rows[-1].append(auroc(t["aupro"]))
        rows[-1].append(r["machine"]["date"][:10])
    header = ["data set", "input px", "what the automatic choices chose", "test image AUROC", "test pixel AUROC"]
    return table([*header, "test AUPRO", "date"], rows)


def _spearman(a: list[float], b: list[float]) -> str:
    rho = rank_correlation(a, b) if len(a) >= 3 else None
    return "-" if rho is None else num(rho, 2)


@renders("choices-summary", *CHOICES)
def choices_summary(*records: Record) -> str:
    return _choices_summary(records, with_method=False)


def _choices_summary(records: Sequence[Record], with_method: bool) -> str:
    rows = []
    for r in records:
        for name, c in r["choices"].items():
            s = c["set"]
            strength = f"{s['strength']} ({len(s.get('kinds', []))} kinds)" if "strength" in s else "-"
            d = c.get("decision") or {}
            kept = "default kept" if d.get("kept_default") else "default beaten"
            if not d:  # score-tscale's taps: the paper picks by hand, so no default to keep
                kept = "no default; best mean of image and pixel AUROC"
            if "margin" in d:
                kept += f" (image +{num(d['margin'], 3)} vs SE {num(d['standard_error'], 3)}"
                if "pixel_margin" in d:
                    kept += f"; pixel {num(d['pixel_margin'], 3)} vs SE {num(d['pixel_standard_error'], 3)}"
                kept += ")"
            keys = list(c["pseudo_validation"])
            rows_pv = [c["pseudo_validation"][k] for k in keys]  # unrounded: ranks as the record's own Spearman
            test = [c["test"][k] for k in keys]
            image = _spearman([r["image_auroc"] if isinstance(r, dict) else float(r) for r in rows_pv],
                              [t["image_auroc"] for t in test])  # fmt: skip
            pixel = "-"
            if all(isinstance(r, dict) and "pixel_auroc" in r for r in rows_pv):
                pixel = _spearman([r["pixel_auroc"] for r in rows_pv], [t["pixel_auroc"] for t in test])
            best = max(keys, key=lambda k: (c["test"][k]["image_auroc"], c["test"][k]["pixel_auroc"]))
            chosen = c["test"][json.dumps(c["chosen"]) if not isinstance(c["chosen"], str) else c["chosen"]]
            rows.append(
                [r["dataset"], *([r["method"]] if with_method else []), name, strength, f"{c['chosen']}: {kept}"]
                + [f"{auroc(chosen['image_auroc'])} / {auroc(chosen['pixel_auroc'])}"]
                + [f"{best}: {auroc(c['test'][best]['image_auroc'])} / {auroc(c['test'][best]['pixel_auroc'])}"]
                + [image, pixel]
            )
    header = ["data set", *(["method"] if with_method else []), "choice", "set strength"]
    header += ["chosen on pseudo-validation", "its test image / pixel AUROC", "best on test (image, then pixel)"]
    return table([*header, "Spearman, image AUROC", "Spearman, pixel AUROC"], rows)


@renders("choices-candidates", *CHOICES)
def choices_candidates(*records: Record) -> str:
    return _choices_candidates(records, with_method=False)


def _choices_candidates(records: Sequence[Record], with_method: bool) -> str:
    rows = []
    for r in records:
        for name, c in r["choices"].items():
            for key, row in c["pseudo_validation"].items():
                test = c["test"][key]
                mark = " (chosen)" if str(c["chosen"]) == key else ""
                rows.append(
                    [r["dataset"], *([r["method"]] if with_method else []), name, key + mark, *_pseudo(row)]
                    + [auroc(test["image_auroc"]), auroc(test["pixel_auroc"]), auroc(test["aupro"])]
                )
    header = ["data set", *(["method"] if with_method else []), "choice", "candidate", "pseudo-val image AUROC"]
    return table([*header, "pseudo-val pixel AUROC", "test image AUROC", "test pixel AUROC", "test AUPRO"], rows)


#: The other methods' automatic choices against the test (runs trained elsewhere: ``choices.py --run``).
CHOICES_METHODS = tuple(
    f"choices_{method}_{dataset}_{tag}.json"
    for dataset in ("magnetic_tile", "bsdata")
    for method, tag in (
        ("score-resilience", "calibration"),
        ("score-tscale", "defaults"),
        ("lafite", "calibration"),
        ("mdps", "calibration"),
    )  # fmt: skip
)


@renders("choices-methods-summary", *CHOICES_METHODS)
def choices_methods_summary(*records: Record) -> str:
    return _choices_summary(records, with_method=True)


@renders("choices-methods-candidates", *CHOICES_METHODS)
def choices_methods_candidates(*records: Record) -> str:
    return _choices_candidates(records, with_method=True)


FUSION = ("fusion_magnetic_tile_gaussian+lafite.json", "fusion_bsdata_gaussian+lafite.json")


@renders("fusion", *FUSION)
def fusion_table(*records: Record) -> str:
    rows = []
    for r in records:
        for name, member in r["members"].items():
            t = member["test"]
            rows.append([r["dataset"], name, "-", auroc(t["image_auroc"]), auroc(t["pixel_auroc"]), auroc(t["aupro"])])
        f, t = r["fusion"], r["fused_test"]
        pseudo = f.get("pseudo_validation", {})
        chosen = ", ".join(f"{k} {auroc(v['image_auroc'])}" for k, v in pseudo.items()) or "-"
        how = f"fused: {f['how']}" + (" (auto)" if pseudo else "")
        rows.append([r["dataset"], how, chosen, auroc(t["image_auroc"]), auroc(t["pixel_auroc"]), auroc(t["aupro"])])
    header = ["data set", "detector", "pseudo-val image AUROC (mean, max)", "test image AUROC", "test pixel AUROC"]
    return table([*header, "test AUPRO"], rows)


TILING = (
    "accuracy_gaussian_magnetic_tile_defaults.json",
    "accuracy_gaussian_magnetic_tile_tiled448.json",
    "accuracy_gaussian_bsdata_defaults.json",
    "accuracy_gaussian_bsdata_tiled448.json",
    "accuracy_gaussian_bsdata_tiled224x550.json",
    "accuracy_gaussian_bsdata_tiled460x1130.json",
)


@renders("tiling", *TILING)
def tiling_table(*records: Record) -> str:
    rows = []
    for r in records:
        tiling, m = r.get("tiling") or {}, r["metrics"]
        if tiling:
            from edgead.methods.tiling import frame_size, tile_origins  # the exported graph's own grid

            (height, width), tile = frame_size(tiling), tiling["tile"]
            across = [len(tile_origins(side, tile, tiling["overlap"])) for side in (height, width)]
            frame = f"{height} px frame" if width == height else f"{width}x{height} frame"
            how = f"{frame}, {across[0]} x {across[1]} tiles of {tile} px"
        else:
            how = f"{r['image_size']} px, whole frame"
        rows.append([r["dataset"], how, auroc(m["image_auroc"]), auroc(m["pixel_auroc"]), auroc(m["aupro"])])
        rows[-1].append(r["machine"]["date"][:10])
    return table(["data set", "input", "test image AUROC", "test pixel AUROC", "test AUPRO", "date"], rows)


TILING_LATENCY = (
    "latency_cpu_gaussian_magnetic_tile_defaults.json",
    "latency_cpu_gaussian_magnetic_tile_tiled448.json",
    "latency_cpu_gaussian_bsdata_defaults.json",
    "latency_cpu_gaussian_bsdata_tiled448.json",
    "latency_cpu_gaussian_bsdata_tiled224x550.json",
    "latency_cpu_gaussian_bsdata_tiled460x1130.json",
)


@renders("tiling-latency", *TILING_LATENCY)
def tiling_latency(*records: Record) -> str:
    rows = []
    for r in records:
        height, width = r["input_shape"][-2:]
        shape = f"{width}x{height}"
        tiled = "_tiled" in r["machine"]["command"]
        how = f"{shape} frame" + (", tiled as in the table above" if tiled else ", whole")
        dataset = "magnetic_tile" if "_magnetic_tile_" in r["machine"]["command"] else "bsdata"  # the --tag
        rows.append([dataset, how, *_latency_row(r)])
        rows[-1] += [r["device"], date(r)]
    header = ["data set", "input", "ONNX Runtime graph ms", "ONNX Runtime `predict` ms", "PyTorch eager ms"]
    return table([*header, "PyTorch / ONNX Runtime (graph)", "CPU", "date"], rows)


FIT_MEMORY = (
    "fit_memory_gaussian_bsdata_tiled460x1130_before.json",
    "fit_memory_gaussian_bsdata_tiled460x1130.json",
)


@renders("fit-memory", *FIT_MEMORY)
def fit_memory_table(*records: Record) -> str:
    rows = []
    for r in records:
        args = r["train_args"]
        option = {name: value for name, value in zip(args, args[1:], strict=False) if name.startswith("--")}
        frame = f"{option.get('--frame-width', option['--image-size'])}x{option['--image-size']}"
        how = f"{frame} frame in {option['--tile']} px tiles" if "--tile" in option else f"{frame} frame"
        dataset, method = Path(option["--data"]).name, option["--method"]
        rows.append([dataset, method, how, r["n_images"], r["source_commit"], num(r["peak_rss_gib"], 1)])
        rows[-1] += [r["machine"]["cpu"], r["machine"]["date"][:10]]
    header = ["data set", "method", "input", "training images (tiles)", "source", "peak resident GiB", "CPU"]
    return table([*header, "date"], rows)


INPUT_SIZE = ("input_size_gaussian_magnetic_tile_defaults.json", "input_size_gaussian_bsdata_defaults.json")


@renders("input-size", *INPUT_SIZE)
def input_size_table(*records: Record) -> str:
    rows = []
    for r in records:
        for size in map(str, r["sizes"]):
            p, t = r["pseudo_validation"][size], r["test"][size]
            mark = " (chosen)" if int(size) == r["chosen"] else ""
            mark += " (default)" if int(size) == r["default"] else ""
            rows.append([r["dataset"], size + mark, auroc(p["image_auroc"]), auroc(p["pixel_auroc"])])
            rows[-1] += [auroc(t["image_auroc"]), auroc(t["pixel_auroc"]), auroc(t["aupro"])]
    header = ["data set", "input px", "pseudo-val image AUROC", "pseudo-val pixel AUROC", "test image AUROC"]
    return table([*header, "test pixel AUROC", "test AUPRO"], rows)


@renders("input-size-summary", *INPUT_SIZE)
def input_size_summary(*records: Record) -> str:
    rows = []
    for r in records:
        s, d = r["set"], r["decision"]
        strength = f"{s['strength']} ({len(s['kinds'])} kinds, {s['validation']} at {max(r['sizes'])} px)"
        margin = f"image +{num(d['margin'], 3)} vs SE {num(d['standard_error'], 3)}" if "margin" in d else "-"
        if "pixel_margin" in d:
            margin += f"; paired pixel +{num(d['pixel_margin'], 3)} vs SE {num(d['pixel_standard_error'], 3)}"
        kept = "default kept" if d.get("kept_default") else "default beaten"
        rows.append([r["dataset"], strength, f"{r['chosen']}: {kept} ({margin})"])
        rows[-1] += [auroc(r["chosen_test_image_auroc"]), f"{r['best_on_test']}: {auroc(r['best_test_image_auroc'])}"]
        rows[-1] += [num(r["spearman_image_auroc"], 2), num(r["spearman_pixel_auroc"], 2), r["machine"]["date"][:10]]
    header = ["data set", "set strength", "chosen on pseudo-validation", "its test image AUROC"]
    header += ["best on test (image AUROC)", "Spearman, image AUROC", "Spearman, pixel AUROC", "date"]
    return table(header, rows)


LAFITE_CALIBRATED = ("lafite_magnetic_tile_calibrated.json", "lafite_bsdata_calibrated.json")


@renders("lafite-calibrated", *LAFITE_SELECTION, *LAFITE_CALIBRATED)
def lafite_calibrated(*records: Record) -> str:
    rows = []
    for r in records:
        (dataset,) = r["datasets"]
        s, res = r["selection"], r["results"][dataset]
        tau_set, edit_set = s.get("tau_set"), s.get("edit_set")
        which = "calibrated (5 kinds)" if edit_set else "the paper's fragments"

        def strength(described: dict[str, Any] | None, name: str) -> str:
            if not described:
                return "1.0"
            tried = described["calibration"]["reference_auroc_by_strength"]
            return f"{described['strength']} ({name} {auroc(tried[str(described['strength'])])})"

        tau, pairs = res["tau_sweep"]["agreement"], res["k_sweep"]["agreement"]["all"]
        chosen = f"{s['chosen']['edit_weighting']}, K = {s['chosen']['k']}"
        rows.append([dataset, which, strength(tau_set, "best tau"), s["chosen"]["tau"], tau["best_on_test"]])
        rows[-1] += [num(tau["spearman"], 2), strength(edit_set, "paper pair"), chosen]
        rows[-1] += [pairs["best_on_test"].replace("/", ", K = "), num(pairs["spearman"], 2)]
        rows[-1] += [auroc(res["lafite"]["image_auroc"]), auroc(res["lafite"]["pixel_auroc"])]
        rows[-1].append(r["machine"]["date"][:10])
    header = ["data set", "pseudo-validation set", "tau set strength (reference AUROC)", "tau chosen"]
    header += ["best tau on test", "Spearman, 5 taus", "pair set strength (reference AUROC)", "pair chosen"]
    header += ["best pair on test", "Spearman, 14 pairs", "test image AUROC", "test pixel AUROC", "date"]
    return table(header, rows)


# Issue 26: INT8 and OpenVINO on the CPU.

INT8 = tuple(
    f"int8_{method}_{dataset}.json"
    for method in ("gaussian", "lafite", "score-resilience")
    for dataset in ("magnetic_tile", "bsdata")
)


@renders("int8", *INT8)
def int8_table(*records: Record) -> str:
    rows = []
    for r in records:
        for name, row in r["results"].items():
            if "not_measured" in row:
                rows.append([r["method"], r["dataset"], name, f"not measured: {row['not_measured']}", *["-"] * 6])
                continue
            t, g, p = row["test"], row["graph_ms"], row["predict_ms"]
            rows.append([r["method"], r["dataset"], name, auroc(t["image_auroc"]), auroc(t["pixel_auroc"])])
            rows[-1] += [
                f"{num(g['median'], 1)} / {num(g['p99'], 1)}",
                num(row["graph_speedup_vs_onnxruntime_fp32"], 2),
            ]
            rows[-1] += [f"{num(p['median'], 1)} / {num(p['p99'], 1)}", r["machine"]["date"][:10]]
    header = ["method", "data set", "backend, precision", "test image AUROC", "test pixel AUROC"]
    header += ["graph ms (median / p99)", "graph speed-up vs ONNX Runtime FP32", "predict 1280x720 ms (median / p99)"]
    return table([*header, "date"], rows)


@renders("int8-gate", *INT8)
def int8_gate_table(*records: Record) -> str:
    rows = []
    for r in records:
        g = r["gate"]
        verdict = "pass" if g["passed"] else "refused: " + "; ".join(g["failures"])
        rows.append([r["method"], r["dataset"], g["n_images"], f"{auroc(g['auroc_fp32'])} / {auroc(g['auroc_int8'])}"])
        rows[-1] += [f"{g['decision_flips']} ({num(100 * g['decision_flip_share'], 1)} %)"]
        rows[-1] += [num(g["score_rank_correlation"], 3), verdict]
    header = ["method", "data set", "held-out images", "pseudo-val AUROC FP32 / INT8", "decisions that differ"]
    return table([*header, "score rank correlation", "export's gate"], rows)


@renders("int8-quantizers", "int8_quantizers_gaussian_magnetic_tile.json")
def int8_quantizers_table(*records: Record) -> str:
    rows = []
    for r in records:
        for name, row in r["results"].items():
            for backend, b in row.items():
                rows.append([r["method"], r["dataset"], name, backend, auroc(b["pseudo_validation_auroc"])])
                rows[-1] += [auroc(b["test_image_auroc"]), num(b["graph_ms"], 1)]
    header = ["method", "data set", "graph", "backend", "pseudo-val AUROC", "test image AUROC", "graph ms (median)"]
    return table(header, rows)


# Issue 28: what the live page costs the loop.


@renders("web-overhead", "web_overhead_gaussian.json")
def web_overhead_table(*records: Record) -> str:
    rows = []
    for r in records:
        s = r["summary"]
        for name, label in (("without", "without --web"), ("with_page", "with --web, one page open")):
            row = s[name]
            rows.append([label, num(row["fps"], 1), num(row["latency_p50_ms"], 1), num(row["latency_p99_ms"], 1)])
        crowd = r["crowded"]
        c = crowd["run"]
        label = f"with --web, {crowd['streams_held']} streams held ({crowd['readers_that_never_read']} never read)"
        rows.append([label, num(c["fps"], 1), num(c["latency_p50_ms"], 1), num(c["latency_p99_ms"], 1)])
    return table(["loop", "FPS", "latency p50 ms", "latency p99 ms"], rows)


# Issue 29: edgead update on a changed line.


@renders("update", "update_gaussian_magnetic_tile.json", "update_lafite_magnetic_tile.json")
def update_table(*records: Record) -> str:
    rows = []
    for r in records:
        b, a = r["before"], r["after"]
        before = f"{b['held_back_false_alarms']} of {b['held_back_images']}"
        rows.append([r["method"], r["dataset"], r["added_images"], before])
        rows[-1] += [f"{a['held_back_false_alarms']} of {a['held_back_images']}", auroc(b["test"]["image_auroc"])]
        rows[-1] += [auroc(a["test"]["image_auroc"]), num(r["test_image_auroc_change"], 4), num(r["update_seconds"], 1)]
    header = ["method", "data set", "images added", "false alarms before", "after", "test image AUROC before"]
    return table([*header, "after", "change", "update seconds (2 cores)"], rows)


# mdps.

MDPS_RUNS = (
    "mdps_ablation_magnetic_tile.json",
    "mdps_ablation_grain.json",
    "mdps_choices_grain.json",
    "mdps_choices_part.json",
)


@renders("mdps-runs", *MDPS_RUNS)
def mdps_runs(*records: Record) -> str:
    rows = [
        [r["dataset"], r["run"], f"{r['preset']}, {r['image_size']} px", _training(r["train"])]
        + [f"{r['test_images']} ({r['test_images_defective']} defective)"]
        for r in records
    ]
    return table(["data", "run", "preset, input", "training steps, time", "test images"], rows)


@renders("mdps-ablation-settings", "mdps_ablation_grain.json", "mdps_ablation_magnetic_tile.json")
def mdps_ablation_settings(*records: Record) -> str:
    p = records[0]["method_params"]
    shared = ("noise_level", "n_samples", "guidance", "rho", "mask_lambda")
    if any(r["method_params"][k] != p[k] for r in records for k in shared):
        raise ValueError("the ablation records differ in more than the step count")
    steps = ", ".join(f"N = {r['method_params']['steps']} on {r['dataset']}" for r in records)
    return (
        f"Fig. 4 ablation (image AUROC / pixel AUROC / AUPRO; T = {p['noise_level']}, N_s = {p['n_samples']},"
        f" {p['guidance']} guidance, rho = {p['rho']}, lambda = {p['mask_lambda']}; DDIM steps as each record's"
        f" `method_params.steps` says: {steps}):"
    )


ABLATION = (
    ("vanilla_ddim", "vanilla DDIM (m = 1, rho = 0)"),
    ("without_mask", "w/o mask (m = 1)"),
    ("without_posterior", "w/o posterior (rho = 0)"),
    ("mdps", "MDPS"),
)


@renders("mdps-ablation", "mdps_ablation_grain.json", "mdps_ablation_magnetic_tile.json")
def mdps_ablation(*records: Record) -> str:
    rows = [
        [f"{r['dataset']} (N = {r['method_params']['steps']})", *(triple(r["rows"][k]) for k, _ in ABLATION)]
        for r in records
    ]
    return table(["", *(label for _, label in ABLATION)], rows)


@renders("mdps-ablation-spread", "mdps_ablation_magnetic_tile.json", "cpu_recipe_score-resilience_magnetic_tile.json")
def mdps_ablation_spread(r: Record, recipe: Record) -> str:
    parts = []
    for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO")):
        values = [r["rows"][k][key] for k, _ in ABLATION]
        parts.append(f"{label} {span(values)} (spread {num(max(values) - min(values), 3)})")
    return (
        f"On {r['dataset']} the four settings span {', '.join(parts)}: the prior ({r['preset']}, {r['image_size']} px,"
        f" {num(r['train']['train_seconds'], 0)} s of CPU training) does not model the tiles; MDPS reaches"
        f" {auroc(r['rows']['mdps']['image_auroc'])} image AUROC, below score-resilience's CPU recipe"
        f" ({auroc(recipe['final']['test']['image_auroc'])}, `cpu_recipe_score-resilience_magnetic_tile.json`)."
    )


MDPS_COST = ("latency_cpu_mdps.json", "mdps_cost_grain.json", "mdps_cost_magnetic_tile.json")
PAPER_SETTING = "N10_Ns1_exact"


def _settings(key: str) -> tuple[str, str, str]:
    steps, samples, guidance = key.split("_", 2)
    return steps[1:], samples[2:], guidance


def _setting_order(key: str) -> tuple[bool, int, int]:
    steps, samples, guidance = _settings(key)
    return guidance != "exact", int(samples), int(steps)


@renders("mdps-cost-baseline", "latency_cpu_mdps.json")
def mdps_cost_baseline(r: Record) -> str:
    return (
        "Cost table: latency per image of the exported graph (ONNX Runtime, ms) and as a multiple of the"
        f" score-resilience graph ({num(r['rows']['score-resilience']['onnxruntime_ms'], 2)} ms; {r['baseline']}),"
        f" the PyTorch eager module in the same run ({r['timing']}), export time, and image AUROC per data set:"
    )


@renders("mdps-cost", *MDPS_COST)
def mdps_cost(latency: Record, *accuracy: Record) -> str:
    rows = []
    for key in sorted((k for k in latency["rows"] if k != "score-resilience"), key=_setting_order):
        lat = latency["rows"][key]
        steps, samples, guidance = _settings(key)
        rows.append(
            [steps, samples, guidance + (" (paper)" if key == PAPER_SETTING else ""), num(lat["onnxruntime_ms"], 1)]
            + [num(lat["vs_score_resilience"], 1), num(lat["torch_eager_ms"], 1), num(lat["export_seconds"], 0)]
            + [lat["onnx_nodes"], *(auroc(a["rows"][key]["image_auroc"]) for a in accuracy)]
        )
    header = ["N", "N_s", "guidance", "ONNX Runtime ms", "x score-resilience", "PyTorch eager ms", "export s"]
    return table([*header, "ONNX nodes", *(a["dataset"] for a in accuracy)], rows)


@renders("mdps-cost-reading", *MDPS_COST)
def mdps_cost_reading(latency: Record, grain: Record, tile: Record) -> str:
    rows = {k: v for k, v in latency["rows"].items() if k != "score-resilience"}
    paper = {a["dataset"]: a["rows"][PAPER_SETTING]["image_auroc"] for a in (grain, tile)}
    close = [k for k in rows if all(paper[a["dataset"]] - a["rows"][k]["image_auroc"] <= 0.02 for a in (grain, tile))]
    best = min(close, key=lambda k: rows[k]["onnxruntime_ms"])
    steps, samples, guidance = _settings(best)
    exact = [v for k, v in rows.items() if k.endswith("_exact")]
    slowest = min(rows, key=lambda k: rows[k]["speedup_vs_torch_eager"])
    tile_image = [v["image_auroc"] for v in tile["rows"].values()]
    return (
        f"The cheapest setting within 0.02 of the paper setting's image AUROC on both data sets: N = {steps},"
        f" N_s = {samples}, {guidance} guidance, {num(rows[best]['onnxruntime_ms'], 1)} ms per image,"
        f" {ratio(rows[best]['vs_score_resilience'], 1)} the score-resilience graph and"
        f" {ratio(rows[PAPER_SETTING]['onnxruntime_ms'] / rows[best]['onnxruntime_ms'], 1)} cheaper than the paper"
        f" setting (pixel AUROC {auroc(grain['rows'][best]['pixel_auroc'])} vs"
        f" {auroc(grain['rows'][PAPER_SETTING]['pixel_auroc'])} on {grain['dataset']}). On {tile['dataset']} the"
        f" {len(tile_image)} settings span image AUROC {span(tile_image)}, so that half of the conclusion is weak"
        " (the prior is weak there, above). The exported graph is"
        f" {span([v['speedup_vs_torch_eager'] for v in rows.values()], ratio)} faster than PyTorch eager (least for"
        f" N = {_settings(slowest)[0]}, N_s = {_settings(slowest)[1]}, {_settings(slowest)[2]} guidance). Export of"
        f" exact guidance takes {span([v['export_seconds'] for v in exact], lambda v: num(v, 0))} s (the forward"
        f" and backward passes unrolled, {span([v['onnx_nodes'] for v in exact], str)} ONNX nodes)."
    )


# Triton.


@renders("triton-setup", "triton_cameras_cpu_gaussian.json")
def triton_setup(r: Record) -> str:
    e = r["export"]
    text = (
        f"{e['method']} at {e['input']['image_size']} px; frames: {r['frames']}; server: {r['server']}; client:"
        f" {r['client']}; local: {r['local']}; {r['timing']}. The export the server ran has batch {e['batch']}"
        " (`export.batch` in the record)"
    )
    if e["batch"] == 1:
        text += (
            ": it was made before `--format triton` exported a dynamic batch dimension, so the dynamic batcher"
            " could not run queued frames as one batch and every frame ran alone"
        )
    return text + "."


def _triton_rows(r: Record) -> list[tuple[Record, Record]]:
    local = {row["cameras"]: row for row in r["rows"]["local"]}
    return [(row, local[row["cameras"]]) for row in r["rows"]["triton"]]


@renders("triton-cameras", "triton_cameras_cpu_gaussian.json")
def triton_cameras(r: Record) -> str:
    rows = [
        [t["cameras"], num(t["fps_total"], 1), f"{num(t['latency_p50_ms'], 1)} / {num(t['latency_p99_ms'], 1)}"]
        + [num(lo["fps_total"], 1), f"{num(lo['latency_p50_ms'], 1)} / {num(lo['latency_p99_ms'], 1)}"]
        + [percent(t["fps_total"], lo["fps_total"])]
        for t, lo in _triton_rows(r)
    ]
    header = ["cameras", "Triton: FPS (all cameras)", "p50 / p99 ms"]
    header += ["local Detectors, one per camera: FPS (all cameras)", "p50 / p99 ms", "Triton / local FPS"]
    return table(header, rows)


@renders("triton-reading", "triton_cameras_cpu_gaussian.json")
def triton_reading(r: Record) -> str:
    (t1, l1), *_, (tn, ln) = _triton_rows(r)
    return (
        f"Triton reaches {percent(tn['fps_total'], ln['fps_total'])} of the local throughput at {tn['cameras']}"
        f" cameras ({percent(t1['fps_total'], l1['fps_total'])} at {t1['cameras']}). Its throughput grows"
        f" {ratio(tn['fps_total'] / t1['fps_total'])} from {t1['cameras']} camera to {tn['cameras']} while the"
        f" local detectors' falls from {num(l1['fps_total'], 1)} to {num(ln['fps_total'], 1)} FPS."
    )


# CPU-budget recipes.


def _recipe(recipe: Record) -> str:
    return f"{recipe['preset']}, {recipe['image_size']} px, batch {recipe['batch_size']}, lr {recipe['lr']}"


def _short(recipe: Record) -> str:
    return f"{recipe['preset']} at {recipe['image_size']} px"


def _recipe_row(c: Record, label: str) -> list[str]:
    return [
        label,
        f"{num(c['budget_s'] / 60, 0)} min",
        f"{c['steps_done']} / {c['steps_planned']}",
        auroc(c["pseudo_validation"]["image_auroc"]),
        *_metric_cells(c["test"]),
    ]


def recipe_table(r: Record) -> str:
    rows = [_recipe_row(c, _recipe(c["recipe"])) for c in r["candidates"]]
    rows.append(_recipe_row(r["final"], f"**chosen: {_recipe(r['chosen'])}**"))
    header = ["recipe", "budget", "steps done / planned", "pseudo-val image AUROC", "test image AUROC"]
    return table([*header, "test pixel AUROC", "AUPRO"], rows)


@renders("cpu-recipe-score-resilience", "cpu_recipe_score-resilience_magnetic_tile.json")
def cpu_recipe_score_resilience(r: Record) -> str:
    return recipe_table(r)


@renders("cpu-recipe-score-tscale", "cpu_recipe_score-tscale_magnetic_tile.json")
def cpu_recipe_score_tscale(r: Record) -> str:
    return recipe_table(r)


def _proxies(r: Record) -> tuple[Record, Record, list[float], list[float]]:
    """(picked candidate, best candidate on the test set, pseudo-validation and test image AUROCs)."""
    candidates = r["candidates"]
    picked = next(c for c in candidates if c["recipe"] == r["chosen"])
    best = next(c for c in candidates if c["recipe"] == r["test_best_proxy"])
    pseudo = sorted(c["pseudo_validation"]["image_auroc"] for c in candidates)
    return picked, best, pseudo, [c["test"]["image_auroc"] for c in candidates]


@renders(
    "cpu-recipe-score-resilience-reading",
    "cpu_recipe_score-resilience_magnetic_tile.json",
    "accuracy_score-resilience_magnetic_tile_tiny.json",
)
def cpu_recipe_score_resilience_reading(r: Record, earlier: Record) -> str:
    picked, best, pseudo, test = _proxies(r)
    pv, final = picked["pseudo_validation"], r["final"]
    runs = [*r["candidates"], final]
    short = [f"{c['steps_done']} of {c['steps_planned']}" for c in runs if c["steps_done"] < c["steps_planned"]]
    per_step = ", ".join(f"{_short(c['recipe'])} {num(c['seconds_per_step'], 2)} s" for c in r["candidates"])
    spread = (
        f"{num(pseudo[-1] - pseudo[0], 3)} from worst to best, {num(pseudo[-1] - pseudo[-2], 3)} between the top two"
    )
    return "\n".join(
        [
            f"- The {len(r['candidates'])} proxies span {span(pseudo)} on pseudo-validation ({spread};"
            f" {pv['n_normal']} held-out normals + {pv['n_pseudo']} pseudo-anomalies) and {span(test)} on the test"
            f" set. Pseudo-validation picked {_recipe(picked['recipe'])} (test {auroc(picked['test']['image_auroc'])});"
            f" the best proxy on the test set was {_recipe(best['recipe'])} ({auroc(best['test']['image_auroc'])}).",
            f"- The {num(r['budget_minutes'], 0)}-minute run of the chosen recipe reached test image / pixel AUROC /"
            f" AUPRO {triple(final['test'])}, against {triple(earlier['metrics'])} for the earlier"
            f" {earlier['train']['steps']}-step {earlier['preset']} run at {earlier['image_size']} px"
            f" (`accuracy_score-resilience_magnetic_tile_tiny.json`). Pseudo-validation rose to"
            f" {auroc(final['pseudo_validation']['image_auroc'])} while the test stayed at"
            f" {auroc(final['test']['image_auroc'])}.",
            f"- Steps done short of the plan: {' and '.join(short) or 'none'}. Seconds per step (probe): {per_step}.",
        ]
    )


@renders(
    "cpu-recipe-score-tscale-reading",
    "cpu_recipe_score-tscale_magnetic_tile.json",
    "accuracy_score-tscale_magnetic_tile_tiny.json",
)
def cpu_recipe_score_tscale_reading(r: Record, earlier: Record) -> str:
    picked, best, _, _ = _proxies(r)
    final = r["final"]
    gap = best["test"]["image_auroc"] - picked["test"]["image_auroc"]
    return "\n".join(
        [
            f"- Pseudo-validation picked {_recipe(picked['recipe'])}"
            f" ({auroc(picked['pseudo_validation']['image_auroc'])}), {num(gap, 3)} on the test set below the best"
            f" proxy ({_recipe(best['recipe'])}, {auroc(best['test']['image_auroc'])}).",
            f"- The {num(r['budget_minutes'], 0)}-minute run reached pseudo-validation"
            f" {auroc(final['pseudo_validation']['image_auroc'])} (its proxy:"
            f" {auroc(picked['pseudo_validation']['image_auroc'])}) and test image AUROC"
            f" {auroc(final['test']['image_auroc'])} (its proxy: {auroc(picked['test']['image_auroc'])}); the accuracy"
            f" table's {earlier['train']['steps']}-step run: {auroc(earlier['metrics']['image_auroc'])}.",
        ]
    )


# The README.


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked block re-rendered from the records in ``results``."""
    used: list[str] = []
    cache: dict[str, Record] = {}

    def load(name: str) -> Record:
        if name not in cache:
            cache[name] = json.loads((results / name).read_text())
        return cache[name]

    def replace(match: re.Match[str]) -> str:
        kind, name = match.groups()
        if name not in RENDERERS:
            raise ValueError(f"the README marks a block {name!r} that no renderer writes")
        renderer = RENDERERS[name]
        used.append(name)
        body = renderer.render(*(load(f) for f in renderer.files)).strip("\n")
        if kind == "text":
            body = wrap(body)
        return f"<!-- {kind}: {name} -->\n{body}\n<!-- /{kind} -->"

    rendered = BLOCK.sub(replace, text)
    if len(OPENING.findall(text)) != len(used):
        raise ValueError("a block marker in the README has no matching end marker")
    unused = sorted(set(RENDERERS) - set(used))
    if unused or len(used) != len(set(used)):
        raise ValueError(f"every renderer needs exactly one block in the README; unused: {unused}, used: {used}")
    return rendered


@renders("frame-path", "frame_path_cpu_colour_order.json")
def frame_path(record: Record) -> str:
    rows = [
        [
            row["method"],
            f"{row['image_size']} px, {row['interpolation']}",
            num(row["baseline"]["overhead"], 2),
            num(row["current"]["overhead"], 2),
            percent(row["current"]["overhead"], row["baseline"]["overhead"]),
            num(row["resize_alone_ms"][row["interpolation"]], 2),
            num(row["resize_alone_ms"]["bilinear"], 2),
            num(row["baseline"]["total"], 2),
            num(row["current"]["total"], 2),
        ]
        for row in record["rows"]
    ]
    width, height = record["frame_size"]
    header = [
        "method",
        "input",
        f"`predict` - graph, before ({record['baseline_ref']}) ms",
        "after ms",
        "after / before",
        "the input's resize alone ms",
        "a bilinear resize alone ms",
        "`predict` before ms",
        "`predict` after ms",
    ]
    return table(header, rows) + f"\n\n{width}x{height} frame; {record['machine']['cpu']}, {record['machine']['date']}."


def _recipe_flags(recipe: Record) -> str:
    return (
        f"--preset {recipe['preset']} --image-size {recipe['image_size']} --batch-size {recipe['batch_size']} "
        f"--lr {recipe['lr']:g}"
    )


def recipe_rule(record: Record) -> str:
    """The recommendation of benchmarks/cpu_recipe.py's rule (no test figure) from the recorded proxies."""
    rec = record["recommendation"]
    tied = "; ".join(_recipe_flags(r) for r in rec["tied"])
    return wrap(
        f"Rule (fixed before reading any test figure): {rec['rule']}. One standard error here is "
        f"{num(rec['standard_error'], 3)}; tied: {tied}. Recommended: `{_recipe_flags(rec['recommended'])}` "
        f"(`{rec['command']}`)."
    )


@renders("cpu-recipe-score-resilience-rule", "cpu_recipe_score-resilience_magnetic_tile.json")
def cpu_recipe_score_resilience_rule(record: Record) -> str:
    return recipe_rule(record)


@renders("cpu-recipe-score-tscale-rule", "cpu_recipe_score-tscale_magnetic_tile.json")
def cpu_recipe_score_tscale_rule(record: Record) -> str:
    return recipe_rule(record)


# gaussian: fit order (paper vs full) and the pseudo-validation choices of the defaults.

FIT_ORDER_FILES = tuple(
    f"accuracy_gaussian_{d}_{tag}.json" for d in ("magnetic_tile", "bsdata") for tag in ("defaults", "fit_full")
)


def _pseudo_image(record: Record) -> float:
    """Pseudo-validation image AUROC of the OPCA fraction the run chose (eq. 4's pooled score)."""
    selection = record["train"]["opca_selection"]
    return selection["pseudo_validation_image_auroc"][str(selection["selected"])]


def _pseudo_pixel(record: Record) -> float:
    selection = record["train"]["map_statistics_selection"]
    return selection["pseudo_validation"][selection["selected"]]["pixel_auroc"]


@renders("gaussian-fit-order", *FIT_ORDER_FILES)
def gaussian_fit_order(*records: Record) -> str:
    header = ["dataset", "fit_order", "OPCA fraction", "pseudo-val image AUROC", "map statistics"]
    header += ["pseudo-val pixel AUROC", "test image AUROC", "test pixel AUROC", "test AUPRO", "date"]
    rows = []
    for r in records:
        selection = r["train"]["map_statistics_selection"]
        rows.append(
            [r["dataset"], r["method_params_resolved"]["fit_order"], r["train"]["opca_selection"]["selected"]]
            + [num(_pseudo_image(r), 4), selection["selected"], num(_pseudo_pixel(r), 4)]
            + [num(r["metrics"][k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")]
            + [date(r)]
        )
    return table(header, rows)


@renders("gaussian-fit-order-rule", *FIT_ORDER_FILES)
def gaussian_fit_order_rule(*records: Record) -> str:
    """The rule for the default: paper unless full's pseudo-validation image AUROC is higher by more than one
    standard error on both data sets. Fails when the defaults records disagree with the rule's outcome."""
    parts, full_wins = [], []
    for paper, full in zip(records[::2], records[1::2], strict=True):
        orders = (paper["method_params_resolved"]["fit_order"], full["method_params_resolved"]["fit_order"])
        if orders != ("paper", "full"):
            raise ValueError("expected the defaults record with fit_order=paper and the fit_full record")
        selection = paper["train"]["opca_selection"]
        error = auroc_standard_error(
            _pseudo_image(paper), n_positive=selection["n_pseudo"], n_negative=selection["n_normal"]
        )
        gain = _pseudo_image(full) - _pseudo_image(paper)
        full_wins.append(gain > error)
        parts.append(
            f"{paper['dataset']} {num(gain, 4)} (standard error {num(error, 4)}; {selection['n_normal']} held-out"
            f" normals, {selection['n_pseudo']} pseudo-anomalies)"
        )
    outcome = "full" if all(full_wins) else "paper"
    if outcome != "paper":
        raise ValueError("the rule now chooses fit_order=full, but the defaults records use paper: rerun them")
    summary = f"Pseudo-validation image AUROC of full minus paper: {'; '.join(parts)}."
    return f"{summary} The rule keeps `fit_order={outcome}`."


@renders(
    "gaussian-defaults-choices",
    "accuracy_gaussian_magnetic_tile_defaults.json",
    "accuracy_gaussian_bsdata_defaults.json",
)
def gaussian_defaults_choices(*records: Record) -> str:
    """What each defaults run chose by pseudo-validation, with every candidate's figure."""
    lines = []
    for r in records:
        maps = r["train"]["map_statistics_selection"]
        pixel = ", ".join(f"{name}: {auroc(row['pixel_auroc'])}" for name, row in maps["pseudo_validation"].items())
        fractions = r["train"]["opca_selection"]["pseudo_validation_image_auroc"]
        image = ", ".join(f"{name}: {auroc(value)}" for name, value in fractions.items())
        lines.append(
            f"- {r['dataset']} ({r['image_size']} px, fit_order={r['method_params_resolved']['fit_order']},"
            f" {maps['n_normal']} held-out normals + {maps['n_pseudo']} pseudo-anomalies): OPCA fraction"
            f" {r['train']['opca_selection']['selected']} (pseudo-validation image AUROC {image}); map statistics"
            f" {maps['selected']} (pseudo-validation pixel AUROC {pixel})."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff when the README is stale")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON records")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    rendered = render(current, args.results)
    if args.check:
        if rendered == current:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), rendered.splitlines(keepends=True), "README.md", "rendered"
        )
        sys.stdout.writelines(diff)
        print(f"\n{args.readme} is stale: run python benchmarks/render_results.py")
        return 1
    if rendered != current:
        from edgead.data.files import write_bytes_atomic

        write_bytes_atomic(args.readme, rendered.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

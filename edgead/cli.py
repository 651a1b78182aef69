"""The ``edgead`` command line: train, eval, export, run, bench, demo and info."""

from __future__ import annotations

import inspect
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgead import __version__
from edgead.methods import implemented_methods
from edgead.runtime.drift import DEFAULT_WINDOW, MIN_WINDOW

#: ``--method`` help suffix: the methods this install has (read from the method folders, no torch import).
METHODS = ", ".join(implemented_methods())

app = typer.Typer(
    help="Edge deployment toolkit for unsupervised visual anomaly detection.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # never break a file name across lines

USER_ERRORS = (FileNotFoundError, ValueError, NotImplementedError, FloatingPointError)


def _running(used: dict) -> str:
    """``METHOD from EXPORT on BACKEND [providers] (PRECISION)`` for the run/predict banners."""
    providers = f" [{', '.join(used['providers'])}]" if used.get("providers") else ""
    providers += f" [{used['device']}]" if used.get("device") else ""
    return f"{used['method']} from {used['export']} on {used['backend']}{providers} ({used['precision']})"


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}")
    raise typer.Exit(code=2)


def _check_folders(paths: list[Path], what: str) -> None:
    """Fail fast (before torch is imported) when a folder a command needs does not exist."""
    for path in paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: {what} not found")


def _known_method(name: str) -> str:
    """``name`` if this install has the method, else the registry's error listing the methods."""
    if name not in implemented_methods():
        from edgead.methods import get_method

        get_method(name)  # raises, naming the available (and planned) methods
    return name


def _metrics_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=escape(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def _parse_params(items: list[str]) -> dict[str, object]:
    """``--param KEY=VALUE`` pairs; VALUE is JSON where it parses, else the plain string."""
    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


#: Every command where a person waits shows progress with an ETA (plain lines when not on a terminal).
OPT_PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show progress (with an ETA) on standard error.")
OPT_BACKEND_HELP = 'auto, tensorrt, onnxruntime or openvino (pip install "edgead[openvino]").'
OPT_PRECISION = typer.Option(
    None, "--precision", help="fp32, fp16 or int8, if the export has it (default: fp32, or the engine's)."
)
OPT_DEVICE = typer.Option(
    None, "--device", help="With --backend openvino: CPU (default), GPU, NPU, ... (edgead info lists them)."
)


# ------------------------------------------------------------------------------------------------ run spec
@dataclass(frozen=True)
class SpecOption:
    """One command-line option that sets a field of ``edgead.spec.RunSpec`` (``train.<name>``: of its
    ``TrainConfig``); declared once here, added to ``train`` and ``tune`` by :func:`spec_options`."""

    name: str
    annotation: object
    option: typer.models.OptionInfo
    field: str
    convert: Callable[[Any], Any] | None = None


SPEC_OPTIONS: tuple[SpecOption, ...] = (
    SpecOption("config", Path | None, typer.Option(
        None, "--config", help="Start from a spec file (JSON or YAML; a run's config.json repeats that run); options "
        "given here override its settings."), ""),
    SpecOption("data", list[Path], typer.Option(
        [], "--data", help="Normal images: an MVTec-layout root (<data>/train/good) or a plain folder; repeat it to "
        "train one unified model on several data sets."), "data", lambda v: [str(p) for p in v]),
    SpecOption("preset", str | None, typer.Option(
        None, "--preset", help="Network size of methods with a U-Net: tiny (tests), small (default; edge, CPU), "
        "paper."), "preset"),
    SpecOption("image_size", int | None, typer.Option(
        None, "--image-size", help="Square input size in pixels (default: the method's); with --tile, the frame's "
        "size (its height with --frame-width)."), "image_size"),
    SpecOption("channels", int, typer.Option(3, "--channels", help="3 for RGB, 1 to train on grayscale."), "channels"),
    SpecOption("tile", int | None, typer.Option(
        None, "--tile", help="Tiled inference for small defects: the model sees TILE x TILE tiles of the frame "
        "resized to --image-size (one exported graph stitches their maps)."), "tile"),
    SpecOption("tile_overlap", float, typer.Option(
        0.25, "--tile-overlap", help="Overlap of neighbouring tiles, as a share of a tile."), "tile_overlap"),
    SpecOption("frame_width", int | None, typer.Option(
        None, "--frame-width", help="With --tile: the frame's width, to keep a camera's aspect ratio (e.g. "
        "--image-size 288 --frame-width 704 for 1130x460 images); --image-size is then its height."), "frame_width"),
    SpecOption("steps", int, typer.Option(
        20000, "--steps", help="Optimiser steps (methods that train a network)."), "train.steps"),
    SpecOption("epochs", int | None, typer.Option(
        None, "--epochs", help="Train this many passes over the images instead of --steps (steps derived from the "
        "data set size; the score-resilience paper's recipe is 3000 epochs)."), "train.epochs"),
    SpecOption("batch_size", int, typer.Option(
        16, "--batch-size", help="Images per step (per process under torchrun)."), "train.batch_size"),
    SpecOption("lr", float, typer.Option(1e-4, "--lr", help="AdamW learning rate."), "train.lr"),
    SpecOption("weight_decay", float, typer.Option(
        1e-3, "--weight-decay", help="AdamW weight decay."), "train.weight_decay"),
    SpecOption("lr_schedule", str, typer.Option(
        "multistep", "--lr-schedule", help="multistep (x0.1 at 1/3, 2/3), cosine or constant."), "train.lr_schedule"),
    SpecOption("warmup_steps", int, typer.Option(
        0, "--warmup-steps", help="Linear learning-rate warm-up steps."), "train.warmup_steps"),
    SpecOption("ema_decay", float, typer.Option(
        0.9999, "--ema-decay", help="EMA decay of the weights used for evaluation."), "train.ema_decay"),
    SpecOption("grad_clip", float, typer.Option(
        1.0, "--grad-clip", help="Gradient norm clip (ours, in no paper: a safeguard; 0 disables)."),
        "train.grad_clip"),
    SpecOption("seed", int, typer.Option(0, "--seed", help="Seed for weights, batches and noise."), "train.seed"),
    SpecOption("max_time", float | None, typer.Option(
        None, "--max-time", help="Stop training after this many seconds even if steps remain."), "train.max_time_s"),
    SpecOption("checkpoint_every", int, typer.Option(
        1000, "--checkpoint-every", help="Save a resumable checkpoint every N steps."), "train.checkpoint_every"),
    SpecOption("val_fraction", float, typer.Option(
        0.1, "--val-fraction", help="Normal images held out for threshold calibration and pseudo-validation."),
        "val_fraction"),
    SpecOption("device", str | None, typer.Option(
        None, "--device", help="cpu or cuda (default: cuda when available)."), "device"),
    SpecOption("no_amp", bool, typer.Option(False, "--no-amp", help="Disable mixed precision on CUDA."), "train.amp",
               lambda v: not v),
    SpecOption("param", list[str], typer.Option(
        [], "--param", help="Method hyperparameter KEY=VALUE (JSON value), repeatable, e.g. --param n_draws=5."),
        "params"),
    SpecOption("runs_root", Path, typer.Option(
        Path("runs"), "--runs-root", help="Where default run directories go."), "runs_root", str),
    SpecOption("progress", bool, OPT_PROGRESS, ""),
)  # fmt: skip


def spec_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add every :data:`SPEC_OPTIONS` option to ``command``'s signature (typer reads the signature); the
    command receives them as keyword arguments (``**options``)."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.option, annotation=o.annotation)
        for o in SPEC_OPTIONS
    ]
    command.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
    return command


def _build_spec(ctx: typer.Context, options: dict[str, Any], method: str | None, default_method: str) -> Any:
    """The run spec of a ``train`` / ``tune`` call: the --config file's (or the defaults), then every option
    the user typed; ``--param`` pairs update the file's hyperparameters key by key."""
    from edgead.spec import RunSpec

    config = options.get("config")
    spec = RunSpec.load(config) if config is not None else RunSpec(method=default_method)
    if method is not None:
        spec.method = method
    for option in SPEC_OPTIONS:
        if not option.field:
            continue
        value = options[option.name]
        # by name: typer may bring its own copy of click, whose enum is another class
        source = ctx.get_parameter_source(option.name)
        typed = getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
        if config is not None and not typed:
            continue
        if option.name == "param":
            spec.params = {**spec.params, **_parse_params(value)}
            continue
        value = option.convert(value) if option.convert is not None else value
        if option.field.startswith("train."):
            setattr(spec.train, option.field.removeprefix("train."), value)
        else:
            setattr(spec, option.field, value)
    spec.validate()
    return spec


@app.command()
@spec_options
def train(
    ctx: typer.Context,
    method: str | None = typer.Option(
        None, "--method", help=f"Detection method to fit: {METHODS} (default score-resilience; --resume: the run's)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<method>/<timestamp>)."),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue an interrupted run directory with the settings and data it recorded."
    ),
    **options: Any,
) -> None:
    """Fit a method on defect-free images; save weights, config and the held-out normal images (for export)."""
    try:
        # Everything a user can get wrong is checked before torch is imported (that takes seconds).
        if resume is not None:
            if options["data"]:
                raise ValueError("--resume continues on the data the run recorded; leave --data out")
            if options["config"] is not None:
                raise ValueError("--resume continues with the settings the run recorded; leave --config out")
            from edgead.config import RunConfig
            from edgead.spec import RunSpec

            recorded = RunConfig.load(resume)
            if method is not None and method != recorded.method:
                raise ValueError(f"{resume} is a {recorded.method} run, not {method}")
            spec = RunSpec(method=recorded.method, device=options["device"], out=str(resume))
        else:
            spec = _build_spec(ctx, options, method, "score-resilience")
            if out is not None:
                spec.out = str(out)
            if not spec.data:
                raise ValueError("--data is required: the folder of normal training images (or --config FILE, "
                                 "or --resume RUN)")  # fmt: skip
        _known_method(spec.method)
        _check_folders(spec.data_paths, "data directory")
        if resume is None and spec.out:  # a new run goes into a new or empty folder (or over an edgead run)
            from edgead.config import CONFIG_NAME
            from edgead.data.files import check_output_folder

            run_out = Path(spec.out)
            if run_out.is_dir() and not (run_out / CONFIG_NAME).is_file() and any(run_out.iterdir()):
                names = ", ".join(sorted(p.name for p in run_out.iterdir())[:5])
                raise ValueError(f"--out {run_out}: holds files that are not an edgead run ({names}); choose another "
                                 "--out (a new or empty folder)")  # fmt: skip
            check_output_folder(run_out, "--out")
        from edgead.pipeline import train_run

        run_dir, summary = train_run(
            spec,
            resume=resume,
            progress=options["progress"],
            on_event=lambda line: err_console.print(line, markup=False, soft_wrap=True),
        )
    except USER_ERRORS as err:
        _fail(err)
    except KeyboardInterrupt as err:
        where = getattr(err, "run_dir", None)
        if where is not None:
            err_console.print(
                f"{err}; checkpoint saved. Continue with: edgead train --resume {where}", markup=False, soft_wrap=True
            )
        else:
            err_console.print("interrupted; resume from the last checkpoint with `edgead train --resume RUN`")
        raise typer.Exit(code=130) from None
    if run_dir is not None:
        if "steps" in summary:
            console.print(f"trained {summary['steps']} steps in {summary['train_seconds']} s", soft_wrap=True)
            if not summary.get("reached_target_steps", True):
                from edgead.config import RunConfig

                recorded = RunConfig.load(run_dir).train  # a resumed run keeps its own settings
                console.print(
                    f"note: the time limit (--max-time {recorded.get('max_time_s')} s) stopped training after "
                    f"{summary['steps']} of {recorded.get('steps')} steps",
                    soft_wrap=True,
                    markup=False,
                )
        else:
            console.print(f"fitted in {summary.get('fit_seconds', '?')} s", soft_wrap=True)
        console.print(f"run saved to [bold]{escape(str(run_dir))}[/bold]", soft_wrap=True)


@app.command()
@spec_options
def tune(
    ctx: typer.Context,
    method: str | None = typer.Option(None, "--method", help=f"Method to tune: {METHODS} (default gaussian)."),
    grid: list[str] = typer.Option(
        [], "--grid", help="KEY=V1,V2,... candidates of one parameter, repeatable (default: the method's grid)."
    ),
    **options: Any,
) -> None:
    """Choose free settings on held-out normals + pseudo-anomalies (no test data); keep the best as the run."""
    try:
        spec = _build_spec(ctx, options, method, "gaussian")
        if not spec.data:
            raise ValueError("--data is required: the folder of normal images (or --config FILE)")
        _known_method(spec.method)
        _check_folders(spec.data_paths, "data directory")
        from edgead.methods import get_method
        from edgead.tune import parse_grid, tune_run

        candidates = parse_grid(grid, get_method(spec.method))
        log = lambda line: console.print(line, soft_wrap=True, markup=False)  # noqa: E731
        run_dir, record = tune_run(spec, candidates, progress=options["progress"], log=log)
    except USER_ERRORS as err:
        _fail(err)
    console.print(
        f"chosen {escape(json.dumps(record['chosen']))} of {len(record['candidates'])} candidates", soft_wrap=True
    )
    console.print(
        f"run saved to [bold]{escape(str(run_dir))}[/bold] (every candidate's figures: config.json state.tuning)"
    )


@app.command("eval")
def evaluate(
    data: list[Path] = typer.Option(
        ...,
        "--data",
        help="MVTec-layout root with test/<good|defect>/ and ground_truth/; repeat it to report each data set "
        "and the mean.",
    ),
    method: str = typer.Option(
        "score-resilience", "--method", help=f"Method whose latest run is used when --run is absent: {METHODS}."
    ),
    run: Path | None = typer.Option(None, "--run", help="Run directory (default: the method's latest run)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Report directory (default <run>/eval): new, empty, or an earlier edgead report, which is replaced; a "
        "folder holding other files is refused.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per inference batch."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    top_k: int = typer.Option(8, "--top-k", help="Heatmap overlays of the highest-scoring test images."),
    threshold: float | None = typer.Option(
        None, "--threshold", help="Also report false alarms, misses and per-image decisions at this threshold."
    ),
    export_dir: Path | None = typer.Option(
        None, "--export", help="Report at the threshold this export deploys (its edgead.json)."
    ),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where to look for the latest run."),
    progress: bool = OPT_PROGRESS,
) -> None:
    """Evaluate a run on a test split: metrics table, metrics.json, ROC curve and heatmap overlays."""
    from edgead.config import resolve_latest

    try:
        run_dir = run or resolve_latest(_known_method(method), runs_root)
        _check_folders(data, "test data directory")
        if export_dir is not None:
            if threshold is not None:
                raise ValueError("give --threshold or --export, not both")
            from edgead.runtime.metadata import load_metadata

            threshold = load_metadata(export_dir).threshold_value
        from edgead.report import check_report_folder, claim_report_folder

        # Before any scoring: the report folder must hold nothing but an earlier edgead report (edgead.report).
        out = out if out is not None else Path(run_dir) / "eval"
        check_report_folder(out)
        from edgead.pipeline import evaluate_run, evaluate_runs

        if len(data) == 1:
            metrics, report = evaluate_run(
                run_dir, data[0], out, batch_size=batch_size, device=device, top_k=top_k, threshold=threshold,
                progress=progress,
            )  # fmt: skip
        else:
            results, report = evaluate_runs(
                run_dir, data, out, batch_size=batch_size, device=device, top_k=top_k, threshold=threshold,
                progress=progress,
            )  # fmt: skip
            claim_report_folder(out, (report.name,))  # summary.json: edgead's, so a later eval may replace it
    except USER_ERRORS as err:
        _fail(err)
    if len(data) == 1:
        console.print(_metrics_table(metrics, f"{run_dir}"))
    else:
        table = Table(title=escape(str(run_dir)))
        keys = list(results["mean"])
        table.add_column("data set")
        for key in keys:
            table.add_column(key, justify="right")
        for name, values in results.items():
            table.add_row(name, *(f"{values[k]:.4f}" for k in keys))
        console.print(table)
    console.print(f"report: [bold]{escape(str(report.parent))}[/bold]")


@app.command()
def demo(
    out: Path = typer.Option(
        Path("edgead-demo"), "--out", help="Folder for the generated data, the run and the report."
    ),
    steps: int = typer.Option(1500, "--steps", help="Training steps of the tiny model."),
    max_time: float = typer.Option(240.0, "--max-time", help="Upper bound on training time in seconds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dataset and the training."),
    progress: bool = OPT_PROGRESS,
) -> None:
    """Generate a synthetic defect dataset, train a tiny score-resilience model on the CPU, evaluate it."""
    from edgead.demo import next_commands, run_demo

    try:
        metrics, report = run_demo(out, steps=steps, max_time_s=max_time, seed=seed, progress=progress)
    except USER_ERRORS as err:
        _fail(err)
    console.print(_metrics_table(metrics, "demo: score-resilience (tiny) on synthetic 'print' defects"))
    console.print(f"report: [bold]{escape(str(report.parent))}[/bold]")
    console.print(f"run: [bold]{escape(str(out / 'run'))}[/bold]; next, from this folder:")
    for command in next_commands(out):
        console.print(f"  {command}", soft_wrap=True, markup=False, highlight=False)
    if metrics["image_auroc"] < 0.7:
        err_console.print(f"[bold red]demo failed:[/bold red] image AUROC {metrics['image_auroc']:.3f} < 0.7")
        raise typer.Exit(code=1)


@app.command()
def update(
    run: Path = typer.Option(..., "--run", help="The run to update (kept unchanged)."),
    normal: list[Path] = typer.Option(..., "--normal", help="A folder of normal images to add (repeatable)."),
    runs_root: Path | None = typer.Option(None, "--runs-root", help="Where the new run goes (default: beside it)."),
) -> None:
    """Add normal images to a gaussian or lafite run without training: a new run (lineage recorded) that
    exports and recalibrates as any run. gaussian refits its statistics; lafite extends its memory bank."""
    from edgead.update import UpdateError, update_run

    try:
        new_run, summary = update_run(run, list(normal), runs_root=runs_root, on_event=lambda line: console.print(line))
    except (*USER_ERRORS, UpdateError) as err:
        _fail(err)
    console.print(
        f"updated run: {new_run} ({summary['seconds']:.1f} s); next: edgead export --run {new_run}", markup=False
    )


@app.command()
def feedback(
    alarms: list[str] = typer.Argument(..., help="Saved alarms: their name, or any of their file names."),
    mark: str = typer.Option(..., "--mark", help="false-alarm or defect."),
    alarms_dir: Path = typer.Option(..., "--alarms", help="The run's --save-anomalies folder (only read)."),
    out: Path = typer.Option(Path("feedback"), "--out", help="The feedback folder (feedback.jsonl is appended)."),
    log: Path | None = typer.Option(None, "--log", help="The run's --log: each mark keeps the alarm's log line."),
    note: str = typer.Option("", "--note", help="A remark kept with the mark."),
) -> None:
    """Mark saved alarms as false alarms or confirmed defects: one line each in OUT/feedback.jsonl (append-only)
    and a copy of the frame in OUT/<mark>/; the evidence itself is never changed."""
    from edgead.runtime.feedback import FeedbackError, record_feedback

    try:
        lines = record_feedback(list(alarms), mark, alarms_dir, out, log=log, note=note)
    except (*USER_ERRORS, FeedbackError) as err:
        _fail(err)
    console.print(f"{len(lines)} alarm(s) marked {mark} in {out / 'feedback.jsonl'}", markup=False)


@app.command()
def doctor(
    camera: str | None = typer.Option(
        None, "--camera", help="Also open this SOURCE (as edgead run would), read a frame, report its size and FPS."
    ),
    export_dir: Path | None = typer.Option(None, "--export", help="Also load this export and verify it here."),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where runs are written (checked writable)."),
    exports_root: Path = typer.Option(Path("exports"), "--exports-root", help="Where exports go (checked writable)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the checks as JSON."),
) -> None:
    """Check this machine for what a deployment needs; one line per check with what to fix. Exit 0 when
    nothing failed, 1 when something needed is missing or broken."""
    from edgead.data.files import check_output_file, write_json_atomic
    from edgead.runtime.doctor import run_doctor

    try:
        if json_path is not None:
            check_output_file(json_path, "--json")
        report = run_doctor(camera=camera, export_dir=export_dir, runs_root=runs_root, exports_root=exports_root)
        if json_path is not None:
            write_json_atomic(json_path, report)
    except USER_ERRORS as err:
        _fail(err)
    for check in report["checks"]:
        line = f"[{check['status']:>4}] {check['name']}: {check['detail']}"
        console.print(line + (f"  -> {check['fix']}" if check["fix"] else ""), soft_wrap=True, markup=False)
    failed = [c["name"] for c in report["checks"] if c["status"] == "fail"]
    console.print(f"doctor: {'FAILED: ' + ', '.join(failed) if failed else 'everything needed is here'}", markup=False)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def info(
    method: str | None = typer.Option(
        None,
        "--method",
        help="Show this method's parameters, defaults and paper references instead of the installation summary.",
    ),
) -> None:
    """Versions, available backends and accelerators, and the methods table (or one method's parameters)."""
    import importlib.util

    from edgead.methods import BROKEN, discover, planned_methods
    from edgead.runtime.machine import module_version

    if method is not None:
        try:
            _method_info(method)
        except USER_ERRORS as err:
            _fail(err)
        return
    table = Table(title=f"edgead {__version__}")
    table.add_column("component")
    table.add_column("version / status")
    table.add_row("python", f"{platform.python_version()} ({sys.platform})")
    for module in (
        "numpy", "cv2", "onnx", "onnxruntime", "openvino", "torch", "timm", "tensorrt", "tensorrt_rtx", "pycuda"
    ):  # fmt: skip
        version, error = module_version(module)  # a broken install still lets `info` report the rest
        table.add_row(module, error or version or "not installed")
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        table.add_row("onnxruntime providers", ", ".join(onnxruntime.get_available_providers()))
    if importlib.util.find_spec("openvino") is not None:
        from edgead.runtime.backends.openvino import available_devices

        found = available_devices()
        table.add_row(
            "openvino devices (--device)", "; ".join(f"{d['device']}: {d['name']}" for d in found) or "none found"
        )
    if importlib.util.find_spec("torch") is not None:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        table.add_row("CUDA device (torch)", gpu)
    console.print(table)
    methods = Table(title="methods (edgead info --method NAME for parameters)")
    for column in ("method", "paper", "status", "what it does"):
        methods.add_column(column)
    for entry in discover().values():
        methods.add_row(entry.name, entry.paper, "available", entry.summary)
    for name, (paper, summary) in planned_methods().items():
        methods.add_row(name, paper, "planned", summary)
    for folder, why in BROKEN.items():
        methods.add_row(folder, "", "broken", why)
    console.print(methods)


def _method_info(name: str) -> None:
    from edgead.methods import get_method

    cls = get_method(name)
    table = Table(title=f"{cls.name}: {cls.paper} - {cls.summary}")
    for column in ("parameter", "default", "paper", "meaning", "default from"):
        table.add_column(column, overflow="fold")
    for row in cls.Params.describe():
        meaning = row["doc"] + (f" (one of {', '.join(map(str, row['choices']))})" if row["choices"] else "")
        origin = row["origin"] or "not stated"
        source = origin + (f": {row['why']}" if row["why"] else "")
        table.add_row(row["name"], json.dumps(row["default"]), row["ref"], meaning, source)
    console.print(table)
    console.print(
        f"set with `edgead train --method {cls.name} --param NAME=VALUE` (VALUE in JSON, e.g. a number, "
        '"text" or [1, 2])',
        soft_wrap=True,
    )


def _latest_export(exports_root: Path) -> Path:
    # Hidden folders are export versions and unfinished ones (edgead.export.publish), never a choice.
    found = [p for p in exports_root.glob("*/edgead.json") if not p.parent.name.startswith(".")]
    candidates = sorted(found, key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"no export under {exports_root}; run `edgead export --method NAME` first or pass --export DIR"
        )
    return candidates[-1].parent


@app.command()
def export(
    method: str = typer.Option("score-resilience", "--method", help=f"Method whose latest run is exported: {METHODS}."),
    run: Path | None = typer.Option(None, "--run", help="Run directory (default: the method's latest run)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Export directory (default exports/<method>): new, empty or an earlier export (kept as the previous "
        "version); a folder holding other files, or a link export did not make, is refused.",
    ),
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="fp32; fp16 (also writes model.fp16.onnx with normalisation, reductions and pooling in FP32); int8 "
        "(also writes model.int8.onnx: the networks quantized, calibrated on held-out normals, with its own "
        "threshold, refused when it strays from FP32 beyond the stated tolerance).",
    ),
    fmt: str = typer.Option(
        "onnx",
        "--format",
        help="onnx; tensorrt (ONNX plus an engine built for this device); triton (ONNX plus a Triton model "
        "repository in triton/: a Python-backend model serving raw frames, an onnxruntime_onnx model, a DeepStream "
        "config).",
    ),
    triton_raw_input: bool = typer.Option(
        False,
        "--triton-raw-input",
        help="With --format triton: the onnxruntime_onnx model takes raw RGB 0..255 (normalisation in the graph).",
    ),
    max_batch: int = typer.Option(
        8,
        "--max-batch",
        help="With --format triton: the Triton models batch up to this many requests (a batch-dynamic graph).",
    ),
    batch: int = typer.Option(1, "--batch", help="Fixed batch size of the exported graph."),
    image_size: int | None = typer.Option(None, "--image-size", help="Input size (default: the training size)."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="An MVTec-layout root (adds its test split to the parity check and reports FP32/FP16 AUROC), or a "
        "plain folder of normal images (the threshold's normals where the run holds none).",
    ),
    false_alarm_rate: float = typer.Option(
        0.01,
        "--false-alarm-rate",
        help="Target fraction of normal images flagged; sets the threshold from held-out normal scores.",
    ),
    trt_flavour: str | None = typer.Option(
        None, "--trt-flavour", help="tensorrt or tensorrt_rtx (default: whichever is installed, tensorrt first)."
    ),
    workspace_mb: int = typer.Option(1024, "--workspace-mb", help="TensorRT builder workspace limit in MiB."),
    compute_capability: list[str] = typer.Option(
        [],
        "--compute-capability",
        help="TensorRT-RTX ahead-of-time target, e.g. 8.9; repeatable (default: RTX's portable set).",
    ),
    engine_cache: Path = typer.Option(
        Path(".edgead-cache"),
        "--engine-cache",
        help="Engine and timing cache folder, keyed by ONNX hash, TensorRT version, GPU, precision and shape.",
    ),
    fuse: list[Path] = typer.Option(
        [],
        "--fuse",
        help="Another trained run (same data and input size) fused into one graph: maps and scores standardised "
        "on held-out normals, then averaged or maxed (repeat for more).",
    ),
    fuse_how: str = typer.Option("auto", "--fuse-how", help="auto (chosen on pseudo-validation), mean or max."),
    accept_int8_loss: bool = typer.Option(
        False,
        "--accept-int8-loss",
        help="With --precision int8: write the INT8 graph even where it fails the gate against FP32 (the failures "
        "are printed and recorded in edgead.json).",
    ),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where to look for the latest run."),
    exports_root: Path = typer.Option(Path("exports"), "--exports-root", help="Parent of default export folders."),
) -> None:
    """Trace a trained method's whole inference to ONNX (and a TensorRT engine), check parity, calibrate."""
    from edgead.config import CONFIG_NAME, resolve_latest
    from edgead.export.publish import PublishError, check_target

    try:  # what a user can get wrong, before torch is imported
        run_dir = run or resolve_latest(_known_method(method), runs_root)
        if not (Path(run_dir) / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"--run {run_dir}: no {CONFIG_NAME} here; expected a run made by `edgead train`")
        if data is not None:
            _check_folders([data], "--data directory")
        for other in fuse:
            if not (Path(other) / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"--fuse {other}: no {CONFIG_NAME} here; expected a run made by `edgead train`")
        check_target(out or exports_root / method)  # export's own folder (or new), writable; never a user's
    except (*USER_ERRORS, PublishError) as err:
        _fail(err)
    from edgead.export.exporter import ExportOptions, export_run
    from edgead.export.onnx import ExportError
    from edgead.export.tensorrt import TensorRTUnavailable

    try:
        options = ExportOptions(
            precision=precision,
            format=fmt,
            triton_raw_input=triton_raw_input,
            triton_max_batch=max_batch,
            batch=batch,
            image_size=image_size,
            data=data,
            false_alarm_rate=false_alarm_rate,
            trt_flavour=trt_flavour,
            workspace_mb=workspace_mb,
            compute_capabilities=tuple(compute_capability) or None,
            engine_cache=engine_cache,
            fuse=tuple(fuse),
            fuse_how=fuse_how,
            accept_int8_loss=accept_int8_loss,
        )
        target = out or exports_root / method
        meta = export_run(run_dir, target, options, log=lambda line: console.print(line, soft_wrap=True, markup=False))
    except (*USER_ERRORS, ExportError, TensorRTUnavailable) as err:
        _fail(err)
    files = ", ".join(a["file"] for a in meta["artifacts"].values() if isinstance(a, dict))
    engines = ", ".join(e["file"] for e in meta["artifacts"].get("engines", []))
    console.print(
        f"[bold]{escape(str(target))}[/bold]: {escape(files)}{', ' + escape(engines) if engines else ''}, edgead.json",
        soft_wrap=True,
    )


@app.command()
def predict(
    source: str = typer.Argument(..., help="An image, a folder of images or a video file."),
    export_dir: Path | None = typer.Option(None, "--export", help="Export directory (default: newest under exports/)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="New or empty folder for predictions.csv, predictions.json and overlays (default: a new "
        "predictions/<time>); a failed predict removes what it wrote there.",
    ),
    save: str = typer.Option("anomalies", "--save", help="Overlays to write: all, anomalies or none."),
    backend: str = typer.Option("auto", "--backend", help=OPT_BACKEND_HELP),
    precision: str | None = OPT_PRECISION,
    device: str | None = OPT_DEVICE,
    threshold: float | None = typer.Option(None, "--threshold", help="Override the calibrated threshold."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images instead of stopping."),
    exports_root: Path = typer.Option(Path("exports"), "--exports-root", help="Where to look for the newest export."),
    progress: bool = OPT_PROGRESS,
) -> None:
    """Score every image of a folder, an image or a video: per-image CSV and JSON, overlays, a summary line."""
    from edgead.runtime.backends.base import BackendError
    from edgead.runtime.detector import Detector
    from edgead.runtime.predict import check_out_dir, predict_source
    from edgead.runtime.sources import SourceError

    say = lambda line: err_console.print(line, markup=False)  # noqa: E731
    try:
        check_out_dir(out)  # before the export is loaded: a non-empty or unwritable --out is refused
        detector = Detector.load(
            export_dir or _latest_export(exports_root), backend=backend, precision=precision, threshold=threshold,
            on_event=say, device=device,
        )  # fmt: skip
        say(f"predicting with {_running(detector.describe())}")
        summary = predict_source(detector, source, out, save=save, skip_bad=skip_bad, on_event=say, progress=progress)
    except (*USER_ERRORS, SourceError, BackendError) as err:
        _fail(err)
    skipped = f", {summary.skipped} skipped" if summary.skipped else ""
    console.print(
        f"{summary.images} images, {summary.anomalies} anomalous (threshold {detector.threshold:.6g}){skipped}, "
        f"{summary.seconds / summary.images * 1000:.1f} ms per image; results in {summary.out_dir}",
        soft_wrap=True,
        markup=False,
    )


@app.command()
def verify(
    export_dir: Path | None = typer.Argument(None, help="Export directory (default: newest under exports/)."),
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="auto, tensorrt, onnxruntime, onnxruntime-cuda, onnxruntime-trt (ONNX Runtime's TensorRT provider) "
        "or openvino.",
    ),
    precision: str | None = OPT_PRECISION,
    device: str | None = OPT_DEVICE,
    runs: int = typer.Option(50, "--runs", help="Timed inference calls after warm-up."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON."),
    exports_root: Path = typer.Option(Path("exports"), "--exports-root", help="Where to look for the newest export."),
    progress: bool = OPT_PROGRESS,
) -> None:
    """Prove an export on this device: its verification set against the PyTorch reference, then latency.

    Exit code 0: pass; 1: parity failure; 2: cannot run here (no GPU, missing package, no engine)."""
    from edgead.data.files import check_output_file, write_json_atomic
    from edgead.runtime.verify import VerifyUnavailable, verify_export

    try:
        if json_path is not None:  # before the run: a folder there, a missing or read-only folder
            check_output_file(json_path, "--json")
        target = export_dir or _latest_export(exports_root)
        report = verify_export(
            target, backend=backend, precision=precision, runs=runs, progress=progress, device=device
        )
    except VerifyUnavailable as err:
        err_console.print(f"cannot verify here: {err}", markup=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    except USER_ERRORS as err:
        _fail(err)
    used, parity, latency = report["backend"], report["parity"], report["latency_ms"]
    providers = f" [{', '.join(used['providers'])}]" if "providers" in used else ""
    lines = [
        f"{used['method']} from {used['export']} on {used['backend']}{providers} ({used['precision']}), "
        f"{parity['n_images']} verification images vs the PyTorch FP32 reference",
        f"  score: max abs {parity['score_max_abs_error']:.3e}, max rel {parity['score_max_rel_error']:.3e}",
        f"  anomaly_map: max abs {parity['map_max_abs_error']:.3e}, max rel {parity['map_max_rel_error']:.3e}, "
        f"IoU {parity['map_iou']:.4f}",
        f"  decision flips {parity['decision_flips']}, image AUROC {parity['auroc']} (reference "
        f"{parity['auroc_reference']})",
        f"  tolerances ({used['precision']}): {report['tolerances']}",
        f"  latency: median {latency['median']:.2f} ms, p99 {latency['p99']:.2f} ms ({latency['runs']} runs, "
        f"batch {latency['batch']})",
    ]
    memory = report["device_memory"]
    lines.append(
        f"  device memory: {memory['used_mb']:.0f} MB held by this process after the runs"
        if memory.get("used_mb") is not None
        else f"  device memory: not measured ({memory.get('reason')})"
    )
    poly = parity.get("polygraphy")
    lines.append(
        "  polygraphy comparator: not installed (pip install polygraphy)"
        if poly is None
        else f"  polygraphy {poly['version']} comparator: "
        + ", ".join(f"{name} {'pass' if o['passed'] else 'FAIL'}" for name, o in poly["outputs"].items())
    )
    for line in lines:
        console.print(line, markup=False, soft_wrap=True, highlight=False)
    if json_path is not None:
        try:
            write_json_atomic(json_path, report)  # a temporary file beside it, renamed over it when complete
        except OSError as err:
            _fail(OSError(f"--json {json_path}: cannot write it ({err.strerror or err}); the report is above"))
    if not report["passed"]:
        for failure in report["failures"]:
            err_console.print(f"FAIL {failure}", markup=False, soft_wrap=True)
        raise typer.Exit(code=1)
    console.print("PASS", markup=False)


@app.command("run")
def run_camera(
    camera: str = typer.Option(
        ...,
        "--camera",
        help="Camera index (or /dev/videoN), video file, RTSP/HTTP URL, GStreamer pipeline (elements separated "
        "by ' ! ') or a folder of images.",
    ),
    export_dir: Path | None = typer.Option(None, "--export", help="Export directory (default: newest under exports/)."),
    backend: str = typer.Option("auto", "--backend", help=OPT_BACKEND_HELP),
    precision: str | None = OPT_PRECISION,
    device: str | None = OPT_DEVICE,
    threshold: float | None = typer.Option(None, "--threshold", help="Override the calibrated threshold."),
    show: bool | None = typer.Option(
        None, "--show/--headless", help="Show the overlay window (default: only when a display is available)."
    ),
    save_anomalies: Path | None = typer.Option(
        None, "--save-anomalies", help="Folder for anomalous frames, their overlays and raw maps."
    ),
    log: Path | None = typer.Option(None, "--log", help="JSON-lines log, one line per frame (appended)."),
    log_anomalies_only: bool = typer.Option(False, "--log-anomalies-only", help="Log only anomalous frames."),
    max_frames: int | None = typer.Option(None, "--max-frames", help="Stop after N frames (N >= 1)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Folder sources: skip unreadable images, do not stop."),
    stall_timeout: float | None = typer.Option(
        None,
        "--stall-timeout",
        help="Streams and videos: seconds without data before a read fails and a stream reconnects "
        "(default: OpenCV's 30 s).",
    ),
    give_up_after: float = typer.Option(
        60.0,
        "--give-up-after",
        help="Cameras, streams and pipelines: stop with an error when the source has been connected this many "
        "seconds, over any number of reconnects, without one decodable frame ('inf': never).",
    ),
    exports_root: Path = typer.Option(Path("exports"), "--exports-root", help="Where to look for the newest export."),
    triton: str | None = typer.Option(
        None, "--triton", help="Score on a Triton server instead (host:port, grpc://host:port or http://host:port)."
    ),
    model: str | None = typer.Option(None, "--model", help="With --triton: the model's name on the server."),
    follow: bool = typer.Option(
        False,
        "--follow",
        help="Watch the export folder and switch to a newer version when it loads and passes verify here "
        "(between two frames; a version that fails is refused and the running one kept).",
    ),
    drift_window: int = typer.Option(
        DEFAULT_WINDOW,
        "--drift-window",
        help="Frames in the drift watch's window: a log record when their median score leaves the normals' 90th "
        "percentile (0: no watch).",
    ),
    web: str | None = typer.Option(
        None,
        "--web",
        help="Serve a live page at [HOST:]PORT while running (frame and heatmap, score plot, alarm gallery, "
        'status); 127.0.0.1 unless a host is given; port 0 picks a free one. Needs pip install "edgead[web]".',
    ),
    web_token: str | None = typer.Option(
        None,
        "--web-token",
        envvar="EDGEAD_WEB_TOKEN",
        help="The operator's token: the page's feedback buttons work only with it (without one they are refused).",
    ),
    feedback_dir: Path = typer.Option(
        Path("feedback"), "--feedback", help="Where the page's feedback buttons record (as edgead feedback --out)."
    ),
) -> None:
    """Run an exported detector live: capture thread, heatmap overlay, alarms, log, saved anomalies.

    Outputs are checked before anything starts; a write that fails mid-run (disk full, read-only) stops the run
    with an error and the log ends with a complete line. Ctrl-C and SIGTERM stop it at once, every saved alarm
    with its log line. FFmpeg's own decoder messages are silenced (set OPENCV_FFMPEG_LOGLEVEL to see them).
    """
    from edgead.runtime.backends.base import BackendError
    from edgead.runtime.capture import SourceError, describe_source
    from edgead.runtime.detector import Detector
    from edgead.runtime.live import LiveOptions, check_outputs, run_live

    say = lambda line: err_console.print(line, markup=False)  # noqa: E731
    if drift_window < 0 or 0 < drift_window < MIN_WINDOW:
        _fail(ValueError(f"--drift-window {drift_window}: expected 0 (no watch) or at least {MIN_WINDOW} frames"))
    if (triton is None) != (model is None):
        _fail(ValueError("--triton and --model go together: --triton HOST:PORT --model NAME"))
    if max_frames is not None and max_frames < 1:
        _fail(ValueError(f"--max-frames {max_frames}: expected a number of frames >= 1"))
    if stall_timeout is not None and not (math.isfinite(stall_timeout) and stall_timeout > 0):
        _fail(ValueError(f"--stall-timeout {stall_timeout:g}: expected a positive number of seconds"))
    if not give_up_after > 0:  # "not >" also refuses NaN; inf means never
        _fail(ValueError(f"--give-up-after {give_up_after:g}: expected a positive number of seconds (or inf)"))
    if threshold is not None and not math.isfinite(threshold):
        _fail(ValueError(f"--threshold {threshold:g}: expected a finite number"))
    try:
        options = LiveOptions(
            show=show,
            save_anomalies=save_anomalies,
            log_path=log,
            max_frames=max_frames,
            log_every_frame=not log_anomalies_only,
            skip_bad=skip_bad,
            stall_timeout_s=stall_timeout,
            give_up_after_s=give_up_after,
            drift_window=drift_window or None,
        )
        # Before the detector loads (seconds for an engine): a wrong SOURCE or output path fails at once.
        describe_source(camera)
        check_outputs(options)
        if triton is not None:
            from edgead.runtime.triton_client import TritonPredictor

            detector = TritonPredictor(triton, model, threshold=threshold, on_event=say)
        else:
            detector = Detector.load(
                export_dir or _latest_export(exports_root),
                backend=backend,
                precision=precision,
                threshold=threshold,
                on_event=say,
                device=device,
            )
        say(f"running {_running(detector.describe())}")
        if follow:
            if triton is not None:
                raise ValueError("--follow watches a local export folder; with --triton the server holds the model")
            from edgead.runtime.follow import ExportFollower
            from edgead.runtime.verify import verify_export

            chosen = detector.precision
            options.follow = ExportFollower(
                export_dir or _latest_export(exports_root),
                load=lambda path: Detector.load(path, backend=backend, precision=chosen, device=device),
                check=lambda path: verify_export(path, backend=backend, precision=chosen, runs=3, device=device)[
                    "failures"
                ],
                on_event=lambda event: None,  # the loop sets its own, writing each event between two frames
            )
            options.follow.start()
        if web is not None:
            from edgead.runtime.web import LiveWeb, parse_address

            host, port = parse_address(web)
            options.web = LiveWeb(
                host, port, evidence_dir=save_anomalies, token=web_token, feedback_dir=feedback_dir, log_path=log
            )
            say(f"live page: {options.web.start()}")
        summary: Any = None
        try:
            summary = run_live(detector, camera, options, on_event=say)
        finally:
            if options.web is not None:  # the page says the run ended, then the server stops
                options.web.stop(summary.stop_reason if summary is not None else "stopped by an error")
            if options.follow is not None:
                options.follow.stop()
    except (*USER_ERRORS, SourceError, BackendError, RuntimeError) as err:
        _fail(err)
    console.print(
        f"{summary.frames} frames, {summary.anomalies} anomalous, {summary.fps:.1f} FPS, "
        f"median latency {summary.median_latency_ms:.1f} ms, dropped {summary.dropped} ({summary.stop_reason})",
        soft_wrap=True,
    )


@app.command()
def bench(
    export_dir: Path | None = typer.Option(None, "--export", help="Export directory (default: newest under exports/)."),
    backend: str = typer.Option("auto", "--backend", help=OPT_BACKEND_HELP),
    precision: str | None = OPT_PRECISION,
    device: str | None = OPT_DEVICE,
    warmup: float = typer.Option(2.0, "--warmup", help="Warm-up seconds before measuring."),
    duration: float = typer.Option(10.0, "--duration", help="Measured seconds (at least 50 runs)."),
    torch_baseline: bool = typer.Option(
        True,
        "--torch/--no-torch",
        help="Also time the PyTorch eager module in the same run (needs torch and the run directory).",
    ),
    camera_loop: bool = typer.Option(
        True,
        "--camera-loop/--no-camera-loop",
        help="Also measure end-to-end FPS of the camera loop on a generated video file.",
    ),
    video: Path | None = typer.Option(
        None, "--video", help="Time on this video: its first frame for predict, its frames for the camera loop."
    ),
    frame_size: str = typer.Option(
        "1280x720", "--frame-size", help="WIDTHxHEIGHT of the generated camera frame (without --video)."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the full report as JSON."),
    exports_root: Path = typer.Option(Path("exports"), "--exports-root", help="Where to look for the newest export."),
) -> None:
    """Latency on this device: per-stage percentiles, throughput, ratio to PyTorch eager, camera-loop FPS."""
    try:  # argument mistakes before anything heavy is imported
        parts = frame_size.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--frame-size {frame_size}: expected WIDTHxHEIGHT, e.g. 1920x1080")
        if video is not None and not video.is_file():
            raise FileNotFoundError(f"--video {video}: file not found")
        if json_path is not None:  # before the measurements: a folder there, a missing or read-only folder
            from edgead.data.files import check_output_file

            check_output_file(json_path, "--json")
    except USER_ERRORS as err:
        _fail(err)
    from edgead.bench.report import run_bench

    try:
        report = run_bench(
            export_dir or _latest_export(exports_root),
            backend=backend,
            precision=precision,
            warmup_s=warmup,
            duration_s=duration,
            torch_baseline=torch_baseline,
            camera_loop=camera_loop,
            json_path=json_path,
            video=video,
            frame_size=(int(parts[0]), int(parts[1])),
            device=device,
        )
    except USER_ERRORS as err:
        _fail(err)
    console.print(report["table"], soft_wrap=True, markup=False)


if __name__ == "__main__":
    app()

"""One command that proves edgead on an NVIDIA GPU machine, within the minutes such a machine is held.

From a fresh clone, after the README's GPU install line: makes a small run of every method on generated data
(or takes ``--runs``), exports each at FP32, FP16 and INT8 with TensorRT engines built for this GPU, runs
``edgead verify`` on every backend present (TensorRT, ONNX Runtime CUDA, ONNX Runtime's TensorRT provider) and
``edgead bench`` (graph and whole predict; PyTorch eager CUDA FP32 and FP16 in the same run), and writes every
JSON into ``benchmarks/results/gpu/<gpu name>/`` with ``summary.json`` and ``summary.md``.

Each step is a separate ``edgead`` process with its own time limit: a step that fails is recorded (its exit
code and the end of its output) and the script goes on; steps that need it (a verify needs its export) are
skipped with the reason. ``--budget-s`` (default 480) orders the steps by value (gaussian first, then the
diffusion methods; within a method: export FP16, verify on TensorRT, bench, then the rest) and stops before a
step that would not fit, keeping everything written.

Without a GPU it refuses to write GPU figures and says what is missing. ``--dry-run`` runs the steps a CPU
machine can (ONNX Runtime on the CPU, TensorRT-RTX engine builds) into a folder of its own, so CI tests this
script end to end.

Example:
    python benchmarks/gpu_proof.py                       # on the GPU machine
    python benchmarks/gpu_proof.py --dry-run --out /tmp/proof --budget-s 170
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgead.bench.machine import scrubbed
from edgead.data.files import write_bytes_atomic, write_json_atomic
from edgead.runtime.machine import module_version, nvidia_gpus

RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
#: Most valuable first: the fast statistical method proves the whole path; the diffusion methods follow.
METHODS = ("gaussian", "score-resilience", "lafite", "score-tscale", "mdps")
INSTALL_LINE = (
    'pip install torch torchvision && pip install -e ".[train,trt]" && pip install onnxruntime-gpu '
    "(TensorRT 10 from NVIDIA's pip index or the system; ONNX Runtime GPU replaces the CPU build)"
)


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    needs: str | None = None  # the step whose success this one needs
    output: Path | None = None  # the JSON it writes


@dataclass
class Proof:
    out: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def run(self, step: Step) -> None:
        if step.needs is not None and self.done.get(step.needs, {}).get("status") != "ok":
            self.done[step.name] = {"status": "skipped", "reason": f"needs {step.needs}, which did not pass"}
            return
        if self.left() < min(step.timeout_s, 20.0):
            self.done[step.name] = {"status": "skipped", "reason": f"budget: {self.left():.0f} s left"}
            return
        start = time.monotonic()
        try:
            done = subprocess.run(
                step.command, capture_output=True, text=True, timeout=min(step.timeout_s, self.left())
            )
            status = "ok" if done.returncode == 0 else ("cannot run here" if done.returncode == 2 else "failed")
            tail = (done.stdout + done.stderr)[-1500:]
            code: int | None = done.returncode
        except subprocess.TimeoutExpired as err:
            status, code = "timed out", None
            tail = ((err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace"))[-1500:]
        self.done[step.name] = {
            "status": status,
            "exit_code": code,
            "seconds": round(time.monotonic() - start, 1),
            "command": " ".join(step.command),
            "output_tail": tail if status != "ok" else tail[-300:],
            **({"json": step.output.name} if step.output is not None and step.output.is_file() else {}),
        }
        print(f"[{status}] {step.name} ({self.done[step.name]['seconds']} s)", flush=True)


def machine() -> dict[str, Any]:
    """The GPU (name, compute capability, driver), CUDA as torch sees it, TensorRT and ONNX Runtime."""
    record: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    gpus = nvidia_gpus()
    record["gpus"] = gpus if isinstance(gpus, list) else []
    if isinstance(gpus, str):
        record["gpus_reason"] = gpus
    for module in ("torch", "tensorrt", "tensorrt_rtx", "onnxruntime", "pycuda", "polygraphy"):
        version, error = module_version(module)  # the PyPI tensorrt stub fails at import
        record[module] = f"broken: {error}" if error else version
    if record.get("torch") and not str(record["torch"]).startswith("broken"):
        import torch

        record["cuda"] = torch.version.cuda
        record["torch_cuda_available"] = torch.cuda.is_available()
    if record.get("onnxruntime"):
        import onnxruntime

        record["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return record


def missing_for_gpu(record: dict[str, Any]) -> list[str]:
    """What this machine lacks for GPU figures (empty: it has everything the proof uses)."""
    missing = []
    if not record.get("gpus"):
        missing.append("an NVIDIA GPU (nvidia-smi lists none)")
    if not record.get("torch_cuda_available"):
        missing.append("PyTorch with CUDA (torch.cuda.is_available() is False)")
    trt = record.get("tensorrt") or record.get("tensorrt_rtx")
    if not trt or str(trt).startswith("broken"):
        missing.append("TensorRT (tensorrt 10/11 or tensorrt_rtx) that imports")
    if not record.get("pycuda"):
        missing.append("pycuda (edgead's TensorRT backend)")
    if "CUDAExecutionProvider" not in (record.get("onnxruntime_providers") or []):
        missing.append("onnxruntime-gpu (no CUDAExecutionProvider)")
    return missing


def plan(work: Path, out: Path, dry_run: bool, runs: dict[str, Path], methods: tuple[str, ...]) -> list[Step]:
    edgead = [sys.executable, "-m", "edgead.cli"]
    data = work / "data"
    steps = [Step("data", [sys.executable, "-c", "from edgead.data.synthetic import generate_dataset; "
                           f"generate_dataset({str(data)!r}, size=64, n_train=48, n_test_good=8, n_test_defect=8, "
                           "seed=0)"], 120)]  # fmt: skip
    device = "cpu" if dry_run else "cuda"
    engine = ["--format", "tensorrt"] + (["--trt-flavour", "tensorrt_rtx"] if dry_run else [])
    verify_backends = ("onnxruntime",) if dry_run else ("tensorrt", "onnxruntime-cuda", "onnxruntime-trt")
    for method in methods:
        run = runs.get(method)
        train = f"{method}: train"
        if run is None:
            run = work / "runs" / method / "latest"
            command = [*edgead, "train", "--method", method, "--data", str(data), "--image-size", "64"]
            command += [] if method == "gaussian" else ["--preset", "tiny"]
            command += ["--steps", "20" if dry_run else "300", "--device", device, "--runs-root", str(work / "runs")]
            steps.append(Step(train, [*command, "--no-progress"], 600, needs="data"))
        else:
            steps.append(
                Step(train, [sys.executable, "-c", f"import pathlib; assert pathlib.Path({str(run)!r}).is_dir()"], 10)
            )
        for precision in ("fp16", "fp32", "int8"):
            export = work / "exports" / f"{method}-{precision}"
            name = f"{method}: export {precision}"
            extra = ["--accept-int8-loss"] if precision == "int8" else []
            steps.append(Step(name, [*edgead, "export", "--run", str(run), "--out", str(export), "--precision",
                                     precision, *engine, *extra], 900, needs=train))  # fmt: skip
            for backend in verify_backends:
                report = out / f"verify_{method}_{precision}_{backend}.json"
                steps.append(Step(f"{method}: verify {precision} on {backend}", [*edgead, "verify", str(export),
                                  "--backend", backend, "--precision", precision, "--runs", "20" if dry_run else "200",
                                  "--json", str(report), "--no-progress"], 300, needs=name, output=report))  # fmt: skip
            report = out / f"bench_{method}_{precision}.json"
            steps.append(Step(f"{method}: bench {precision}", [*edgead, "bench", "--export", str(export),
                              "--precision", precision, "--backend", "onnxruntime" if dry_run else "auto",
                              "--warmup", "0.5" if dry_run else "3", "--duration", "1" if dry_run else "10",
                              "--no-camera-loop", "--json", str(report)], 300, needs=name, output=report))  # fmt: skip
    return steps


def summary_table(proof: Proof) -> str:
    lines = ["| step | status | seconds | output |", "|---|---|---|---|"]
    for name, record in proof.done.items():
        detail = record.get("json") or record.get("reason") or ""
        lines.append(f"| {name} | {record['status']} | {record.get('seconds', '-')} | {detail} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--dry-run", action="store_true", help="CPU only: ONNX Runtime and TensorRT-RTX builds")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu/<gpu name>/")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, in order of value")
    parser.add_argument("--run", action="append", default=[], metavar="METHOD=RUN", help="use a trained run")
    args = parser.parse_args()
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    runs = {}
    for item in args.run:
        method, _, path = item.partition("=")
        if method not in METHODS or not path:
            parser.error(f"--run {item!r}: expected METHOD=RUN_DIR with METHOD one of {', '.join(METHODS)}")
        runs[method] = Path(path)
    record = machine()
    missing = missing_for_gpu(record)
    if missing and not args.dry_run:
        print("no GPU figures will be written: this machine lacks " + "; ".join(missing), file=sys.stderr)
        print(f"install on a GPU machine with: {INSTALL_LINE}", file=sys.stderr)
        return 2
    if args.dry_run and args.out is None:
        parser.error("--dry-run writes nowhere by default: give --out (GPU figures go only under results/gpu/)")
    gpu = record["gpus"][0]["name"] if record.get("gpus") else "cpu-dry-run"
    out = args.out or RESULTS / re.sub(r"[^A-Za-z0-9._-]+", "_", gpu)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    proof = Proof(out=out, budget_s=args.budget_s)
    try:
        for step in plan(work, out, args.dry_run, runs, methods):
            proof.run(step)
    finally:
        result = {"machine": record, "dry_run": args.dry_run, "budget_s": args.budget_s,
                  "seconds": round(time.monotonic() - proof.started, 1), "steps": proof.done}  # fmt: skip
        # meant to be committed under results/gpu/: no path of this machine, never half-written
        write_json_atomic(out / "summary.json", scrubbed(result))
        summary_md = f"# edgead GPU proof: {gpu}\n\n{summary_table(proof)}\n"
        write_bytes_atomic(out / "summary.md", scrubbed(summary_md).encode())
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, r in proof.done.items() if r["status"] in ("failed", "timed out")]
    print(f"{len(proof.done)} steps, {len(failed)} failed; {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

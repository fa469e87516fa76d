"""The GPU verdict's runner: the steps in order under one global deadline, each capped to the
time left, results in $OUT as each step ends and summary.txt rewritten after every step.
``benchmarks/gpu_session.sh`` is the command; this file holds the plumbing (stdlib only, so
that it runs on the GPU machine's image and in CI alike).

Deadline: ``--budget`` seconds from the start (default 540: the device tool allows 600 per
command, and machine start-up counts against the 15-minute lease, so 540 leaves a rerun of
about 5 minutes). A step gets ``min(its cap, time left - RESERVE)``; with less than
``MIN_STEP`` left it is skipped. A step past its time is killed with its whole process
group (SIGTERM, then SIGKILL after 5 s). Each step's stdout and stderr go to
``$OUT/<n>_<name>.log`` as it runs.

$OUT holds at most 8 files, all at its top level, named in letters, digits, '.', '_' and
'-' (what the device tool brings back): summary.txt, one log per step (6) and
5_timings.json.

Dry run (``--dry-run`` or ``DFA_VERDICT_DRY_RUN=1``): the same runner, deadline, caps and
files, with CPU stand-ins for the GPU commands (the smoke step lists refs.npz's checks; the
timings stand-in sleeps past any cap, so that the cap and the skip of what follows show).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = os.environ.get("PYTHON", sys.executable)
RESERVE = 5.0  # seconds kept for the summary after the last step (1 in the dry run)
MIN_STEP = 10.0  # a step with less than this left is skipped (1 in the dry run)
MAX_OUT_FILES = 8


@dataclass
class Step:
    name: str
    cap: float  # seconds
    commands: list[str]  # shell commands, run in order in one bash -c
    dry: list[str]  # the dry run's stand-ins
    optional: str = ""  # a program whose absence skips the step (compute-sanitizer)
    index: int = 0  # its number in the full list (file names keep it under --only)
    status: str = "PENDING"
    rc: int | None = None
    seconds: float = 0.0
    given: float = 0.0
    result: str = ""
    extra: dict = field(default_factory=dict)


def steps() -> list[Step]:
    q = shlex.quote
    py = q(PY)
    here = q(str(HERE))
    tf32 = (
        f"{py} -c 'import os, torch, deformarray as d; "
        'print("torch matmul allow_tf32", torch.backends.cuda.matmul.allow_tf32, '
        '"cudnn allow_tf32", torch.backends.cudnn.allow_tf32, '
        '"deformarray get_allow_tf32", d.get_allow_tf32(), '
        '"NVIDIA_TF32_OVERRIDE", os.environ.get("NVIDIA_TF32_OVERRIDE"))\''
    )
    bench = f"{py} -m deformarray.cli bench --backend cupy --op conv --repeat 5 --json"
    table = (
        f"{py} -c 'import json, sys; from deformarray.bench.report import format_report; "
        "print(format_report(json.load(open(sys.argv[1]))))'"
    )
    out = '"$OUT"'
    timeout_opt = "$(" + py + " -c 'import pytest_timeout' 2>/dev/null && echo '-p timeout --timeout 120')"
    return [
        Step(
            "env",
            45,
            [
                "nvidia-smi",
                "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv",
                f"{py} -c 'import cupy; cupy.show_config()'",
                tf32,
                f"{py} -m deformarray.cli info",
                "git rev-parse HEAD 2>/dev/null || echo 'commit: no .git in this copy'",
            ],
            [
                f"{py} -c 'import platform; print(\"python\", platform.python_version())'",
                "git rev-parse HEAD 2>/dev/null || echo 'commit: no .git in this copy'",
                "echo 'dry run: nvidia-smi, cupy.show_config, the TF32 flags and deformarray info skipped'",
            ],
        ),
        Step(
            "smoke",
            150,
            [f"{py} {here}/smoke.py {here}/refs.npz"],
            [f"{py} {here}/smoke.py {here}/refs.npz --list"],
        ),
        Step(
            "torch",
            120,
            [f"{py} {here}/torch_adapter.py"],
            [
                f"{py} -c 'import ast, sys; ast.parse(open(sys.argv[1]).read()); print(\"torch_adapter.py parses\")' "
                f"{here}/torch_adapter.py"
            ],
        ),
        Step(
            "memcheck",
            120,
            [
                "compute-sanitizer --version | head -2",
                f"compute-sanitizer --tool memcheck --error-exitcode 9 {py} {here}/smoke.py {here}/refs.npz "
                "--dtypes float32",
            ],
            ["echo 'dry run: compute-sanitizer memcheck skipped'"],
            optional="compute-sanitizer",
        ),
        Step(
            "timings",
            200,
            [
                "echo '== TF32 off (NVIDIA_TF32_OVERRIDE=0, DEFORMARRAY_ALLOW_TF32=0): float32 and float16'",
                f"NVIDIA_TF32_OVERRIDE=0 DEFORMARRAY_ALLOW_TF32=0 {bench} > {out}/5_timings.json",
                f"{table} {out}/5_timings.json",
                "echo '== TF32 on (DEFORMARRAY_ALLOW_TF32=1, TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, cuDNN default)'",
                f"DEFORMARRAY_ALLOW_TF32=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 {bench} --dtype float32 > /tmp/tf32.json",
                f"{table} /tmp/tf32.json && cat /tmp/tf32.json",
                "echo '== deterministic input gradient (DEFORMARRAY_DETERMINISTIC=1), TF32 off'",
                f"NVIDIA_TF32_OVERRIDE=0 DEFORMARRAY_DETERMINISTIC=1 {bench} > /tmp/det.json",
                f"{table} /tmp/det.json && cat /tmp/det.json",
            ],
            [
                "echo '{\"dry_run\": true}' > " + out + "/5_timings.json",
                f"{py} -c 'import time; print(\"dry run: sleeping past the cap\", flush=True); time.sleep(600)'",
            ],
        ),
        Step(
            "pytest_gpu",
            240,
            [
                # the JAX adapter first, in its own process, with JAX not taking 75 % of the GPU up front
                f"XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 {py} -m pytest -q -m gpu -p no:cacheprovider -rfEs "
                "tests/test_jax_gpu.py",
                f"{py} -m pytest -m gpu -q -p no:cacheprovider -rfEs --durations=15 {timeout_opt} "
                "--ignore=tests/test_jax_gpu.py tests",
            ],
            ["echo 'dry run: pytest -m gpu skipped'"],
        ),
    ]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, index: int, out: Path, left: float, dry: bool) -> None:
    log = out / f"{index}_{step.name}.log"
    if step.optional and not dry and shutil.which(step.optional) is None:
        step.status, step.result = "SKIP", f"{step.optional} not found"
        log.write_text(step.result + "\n")
        return
    budget = min(step.cap, left - (1.0 if dry else RESERVE))
    if budget < (1.0 if dry else MIN_STEP):
        step.status, step.result = "SKIP", f"no time left ({max(0.0, left):.0f} s)"
        log.write_text(step.result + "\n")
        return
    step.given = budget
    script = "\n".join(
        f"echo '$ '{shlex.quote(c)}; {c}; rc=$?; echo \"[rc=$rc]\"; [ $rc = 0 ] || fail=$rc"
        for c in (step.dry if dry else step.commands)
    )
    script = "fail=0\n" + script + "\nexit $fail\n"
    env = dict(os.environ, OUT=str(out), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            ["bash", "-c", script], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            step.rc = proc.wait(budget)
            step.status = "PASS" if step.rc == 0 else "FAIL"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            step.rc = proc.returncode
            step.status = "TIMEOUT"
    step.seconds = time.monotonic() - t0
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("$ ", "[rc="))]
    step.result = lines[-1][:160] if lines else ""
    if step.status == "TIMEOUT":
        step.result = f"killed after {budget:.0f} s; last line: {step.result}"


def write_summary(out: Path, all_steps: list[Step], header: str, done: bool) -> None:
    rows = [header, "", f"{'step':<14}{'status':<9}{'rc':>4}{'secs':>8}{'cap':>6}  result"]
    for s in all_steps:
        i = s.index
        rc = "" if s.rc is None else str(s.rc)
        cap = f"{s.given:.0f}" if s.given else f"({s.cap:.0f})"
        rows.append(f"{f'{i}_{s.name}':<14}{s.status:<9}{rc:>4}{s.seconds:>8.1f}{cap:>6}  {s.result}")
    statuses = {s.status for s in all_steps}
    if not done:
        verdict = "RUNNING"
    elif statuses <= {"PASS", "SKIP"} and "PASS" in statuses:
        verdict = "PASS" if "SKIP" not in statuses else "PASS (with skipped steps: see above)"
    elif statuses & {"FAIL"}:
        verdict = "FAIL"
    else:
        verdict = "INCOMPLETE"
    rows += ["", f"verdict: {verdict}"]
    tmp = out / ".summary.tmp"
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, out / "summary.txt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU verdict: the steps under one deadline")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DFA_VERDICT_DRY_RUN") == "1")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("DFA_VERDICT_BUDGET", 540)))
    parser.add_argument("--only", default="", help="comma-separated step names (default: all, in order)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or ROOT / "gpu-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget
    all_steps = steps()
    for i, step in enumerate(all_steps, 1):
        step.index = i
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in all_steps}
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}; steps: {', '.join(s.name for s in all_steps)}")
        all_steps = [s for s in all_steps if s.name in wanted]
    header = (
        f"GPU verdict{' (DRY RUN: CPU stand-ins, no GPU)' if args.dry_run else ''}, started "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, budget {args.budget:.0f} s, out {out}"
    )
    write_summary(out, all_steps, header, done=False)
    for step in all_steps:
        i = step.index
        run_step(step, i, out, deadline - time.monotonic(), args.dry_run)
        write_summary(out, all_steps, header + f", {time.monotonic() - start:.0f} s elapsed", done=False)
        print(f"{i}_{step.name}: {step.status} ({step.seconds:.1f} s) {step.result}", flush=True)
    write_summary(out, all_steps, header + f", {time.monotonic() - start:.0f} s elapsed", done=True)
    files = [p for p in out.iterdir() if not p.name.startswith(".")]
    if len(files) > MAX_OUT_FILES:
        print(f"warning: {len(files)} files in $OUT, the device tool brings back {MAX_OUT_FILES}", file=sys.stderr)
    print((out / "summary.txt").read_text(), end="")
    return 0 if all(s.status in ("PASS", "SKIP") for s in all_steps) else 1


if __name__ == "__main__":
    sys.exit(main())

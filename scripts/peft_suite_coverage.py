"""Run PEFT's own tests/test_custom_models.py (its LoRA selection) unpatched and with every model patched.

    .venv/bin/python scripts/peft_suite_coverage.py peft-0.21.2.tar.gz            # the whole LoRA selection
    .venv/bin/python scripts/peft_suite_coverage.py peft-0.21.2.tar.gz -k "lora and Conv2d" --mode patched

The sdist comes from ``pip download peft==0.21.2 --no-binary :all: --no-deps`` (once; the script itself
works offline). Its tests/ folder is copied into a work folder (made a package, as PEFT's repository has
it) and pytest runs there twice, with scripts/peft_suite_plugin.py: once as PEFT ships (``unpatched``),
once with ``fused_lora.patch_peft_model`` applied to every PEFT tuner the suite builds (``patched``).
Printed: tests passed / failed / skipped per run, the tests that pass unpatched and fail patched, and
the LoRA layers the patched run created, by kind: on fused_lora's path, or left on PEFT's forward and why
(and how many hold a DoRA adapter). On a CPU fused_lora runs its reference backend (plain PyTorch, the
same integration code; the kernels are tested by the project's own suite) unless ``--backend`` says so.
The selection is pytest's ``-k lora`` (case-insensitive: every test whose id names LoRA or a LoRA-like
tuner) unless ``-k`` gives another. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def extract_tests(sdist: Path, work: Path) -> Path:
    """PEFT's tests/ folder from the sdist (a .tar.gz or an unpacked folder), as a package under `work`."""
    dest = work / "tests"
    if sdist.is_dir():
        shutil.copytree(sdist / "tests", dest)
    else:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
            if not members:
                raise SystemExit(f"{sdist} holds no tests/ folder (an sdist of peft is needed, not a wheel)")
            for m in members:
                m.name = m.name.split("/tests/", 1)[1]
            tar.extractall(dest, members=members, filter="data")
    (dest / "__init__.py").touch()
    return dest


def run_suite(work: Path, mode: str, select: str, timeout: float, extra: list[str], backend: str | None) -> dict:
    xml, layers = work / f"{mode}.xml", work / f"{mode}-layers.json"
    env = {**os.environ, "FUSED_LORA_SUITE_MODE": mode, "FUSED_LORA_SUITE_OUT": str(layers)}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    if backend:
        env["FUSED_LORA_BACKEND"] = backend
    cmd = [sys.executable, "-m", "pytest", "tests/test_custom_models.py", "-k", select, "-p", "peft_suite_plugin"]
    cmd += ["-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rN", f"--junitxml={xml}", *extra]
    start = time.monotonic()
    print(f"[{mode}] {' '.join(cmd[2:])}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, timeout=timeout, capture_output=True, text=True)
        tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    except subprocess.TimeoutExpired:
        raise SystemExit(f"[{mode}] did not finish within {timeout:.0f} s (raise --timeout, or narrow -k)") from None
    print(f"[{mode}] {' '.join(tail)} ({time.monotonic() - start:.0f} s)", flush=True)
    if not xml.exists():
        raise SystemExit(f"[{mode}] pytest wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"tests": parse_junit(xml), "layers": json.loads(layers.read_text()) if layers.exists() else None}


def parse_junit(path: Path) -> dict[str, str]:
    """test id -> passed / failed / error / skipped."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        out[name] = next((t for t in ("failure", "error", "skipped") if t in tags), "passed")
        out[name] = {"failure": "failed"}.get(out[name], out[name])
    return out


def summary(tests: dict[str, str]) -> str:
    c = Counter(tests.values())
    return ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "error", "skipped") if c[k])


def print_layers(layers: dict) -> None:
    rows = layers["layers"]
    total = sum(r["layers"] for r in rows)
    fused = sum(r["layers"] for r in rows if r["outcome"] == "fused")
    dora, dora_only = sum(layers["dora"].values()), layers["dora"].get("variant", 0)
    share = 100 * fused / max(total, 1)
    print(f"\nLoRA layers created by the patched run: {total}; on fused_lora's path: {fused} ({share:.1f} %)")
    print(f"  layers holding a DoRA adapter: {dora}, {dora_only} of them left on PEFT's forward for that alone")
    if total:
        share = 100 * (fused + dora_only) / total
        print(f"  with those {dora_only} DoRA layers on fused_lora's path too: {share:.1f} %")
    by_kind = Counter()
    for r in rows:
        by_kind[r["kind"]] += r["layers"]
    print(f"\n  {'kind':<28} {'layers':>7} {'fused':>7}   left on PEFT's forward: why")
    for kind, n in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        f = sum(r["layers"] for r in rows if r["kind"] == kind and r["outcome"] == "fused")
        left = [r for r in rows if r["kind"] == kind and r["outcome"] != "fused"]
        print(f"  {kind:<28} {n:>7} {f:>7}")
        for r in sorted(left, key=lambda r: -r["layers"]):
            print(f"  {'':<28} {'':>7} {r['layers']:>7}   {r['outcome']}")
    for err, n in layers["patch_errors"].items():
        print(f"  patch_peft_model raised {n} x {err}")
    if layers["stubbed"]:
        print(f"  (empty stand-ins for {', '.join(layers['stubbed'])}: only PEFT's other test files use them)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sdist", type=Path, help="peft-0.21.2.tar.gz (or the unpacked folder)")
    ap.add_argument("-k", dest="select", default="lora", help="pytest -k selection (default: lora)")
    ap.add_argument("--mode", choices=("both", "patched", "unpatched"), default="both")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run")
    ap.add_argument("--backend", choices=("reference", "triton"), help="FUSED_LORA_BACKEND for the runs")
    ap.add_argument("--parallel", action="store_true", help="run the two modes at once (two processes)")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="peft-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tests").exists():
        extract_tests(args.sdist.resolve(), work)
    modes = ("unpatched", "patched") if args.mode == "both" else (args.mode,)
    run = lambda m: run_suite(work, m, args.select, args.timeout, args.pytest_args, args.backend)
    if args.parallel and len(modes) == 2:  # one process per run: two cores take both at once
        with ThreadPoolExecutor(2) as pool:
            runs = dict(zip(modes, pool.map(run, modes), strict=True))
    else:
        runs = {m: run(m) for m in modes}
    print()
    for m, run in runs.items():
        print(f"{m:>9}: {summary(run['tests'])}")
    if len(runs) == 2:
        base, patched = runs["unpatched"]["tests"], runs["patched"]["tests"]
        broke = sorted(t for t, s in base.items() if s == "passed" and patched.get(t) != "passed")
        fixed = sorted(t for t, s in patched.items() if s == "passed" and base.get(t) not in (None, "passed"))
        print(f"passing unpatched, not passing patched: {len(broke)}")
        for t in broke:
            print(f"  {patched.get(t, 'missing')}: {t}")
        if fixed:
            print(f"passing patched only: {len(fixed)}")
    if runs.get("patched", {}).get("layers"):
        print_layers(runs["patched"]["layers"])
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nresults kept in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

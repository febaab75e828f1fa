#!/usr/bin/env python
"""Diff per-test outcomes of the peer runs: plain transformers.Trainer vs RWSAMTrainer in each mode.

Usage: compare.py [--results DIR] [--baseline plain] [MODE ...]      (default modes: every results/* but the baseline)

Reads results/<run>/junit.xml (written by run.sh). For each mode prints the outcome counts, then every test that
passes with the baseline but not with RWSAMTrainer, grouped by root cause: the exception, and where it was raised
(the innermost hf_rwsam frame if there is one, else the innermost frame). Also lists tests that fail only with the
baseline, and, among tests that pass in both, those that never built an RWSAMTrainer (no evidence either way), and tests that fail with both but with a different exception.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

FRAME = re.compile(r"^(?P<file>[^\s:][^:\n]*\.py):(?P<line>\d+): (?:in (?P<func>\S+)|(?P<exc>\w+))?", re.M)


def load(path: Path) -> dict[str, dict]:
    tree = ET.parse(path)
    tests = {}
    for case in tree.iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome, detail, message = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = node.get("message") or ""
                detail = node.text or ""
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests[name] = {"outcome": outcome, "message": message, "detail": detail, "props": props}
    return tests


def cause(test: dict) -> tuple[str, str]:
    """(exception line, origin 'file:line in func') of a failed test."""
    detail = test["detail"]
    exc_lines = [line[2:].strip() for line in detail.splitlines() if line.startswith("E ")]
    exc = next((line for line in exc_lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt|Warning)\b", line)), "")
    if not exc:
        exc = next((line for line in exc_lines if line), test["message"].splitlines()[0] if test["message"] else "?")
    exc = re.sub(r"0x[0-9a-f]+", "0x..", exc)[:160]
    frames = [m.groupdict() for m in FRAME.finditer(detail)]
    ours = [f for f in frames if "hf_rwsam/" in f["file"]]
    pick = (ours or frames or [None])[-1]
    if pick is None:
        return exc, "?"
    where = re.sub(r"^.*?(hf_rwsam/|transformers_tests/|site-packages/)", r"\1", pick["file"])
    source = ""
    src = Path(pick["file"]) if Path(pick["file"]).is_absolute() else Path(__file__).parent / pick["file"]
    try:
        source = src.read_text().splitlines()[int(pick["line"]) - 1].strip()
    except (OSError, IndexError):
        pass
    return exc, f"{where}:{pick['line']}" + (f" in {pick['func']}" if pick.get("func") else "") + (f"  `{source}`" if source else "")


def summarize(tests: dict) -> str:
    counts = defaultdict(int)
    for t in tests.values():
        counts[t["outcome"]] += 1
    return ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped")) + f" ({len(tests)} total)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modes", nargs="*")
    ap.add_argument("--results", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--baseline", default="plain")
    args = ap.parse_args(argv)
    root = Path(args.results)
    base_path = root / args.baseline / "junit.xml"
    if not base_path.exists():
        print(f"no baseline results at {base_path}: run ./run.sh {args.baseline}", file=sys.stderr)
        return 2
    base = load(base_path)
    modes = args.modes or sorted(p.name for p in root.iterdir() if p.name != args.baseline and (p / "junit.xml").exists())
    runtime = lambda run: (root / run / "runtime.txt").read_text().strip() if (root / run / "runtime.txt").exists() else "?"
    print(f"baseline {args.baseline}: {summarize(base)}  [{runtime(args.baseline)}]")
    for mode in modes:
        path = root / mode / "junit.xml"
        if not path.exists():
            print(f"\n== {mode}: no results ({path})")
            continue
        run = load(path)
        print(f"\n== {mode}: {summarize(run)}  [{runtime(mode)}]")
        regressions = {n: t for n, t in run.items() if base.get(n, {}).get("outcome") == "passed" and t["outcome"] in ("failed", "error")}
        other = {n: (base.get(n, {}).get("outcome", "missing"), t["outcome"]) for n, t in run.items()
                 if base.get(n, {}).get("outcome") != t["outcome"] and n not in regressions}
        missing = sorted(set(base) - set(run))
        groups = defaultdict(list)
        for name, t in sorted(regressions.items()):
            groups[cause(t)].append(name)
        print(f"  pass with plain Trainer, fail with RWSAMTrainer: {len(regressions)} test(s) in {len(groups)} group(s)")
        for (exc, where), names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            print(f"  - [{len(names)}] {exc}\n        at {where}")
            for name in names:
                print(f"        {name}")
        if other:
            print("  other outcome changes (baseline -> mode):")
            for name, (b, m) in sorted(other.items()):
                print(f"        {name}: {b} -> {m}")
        if missing:
            print(f"  not run in this mode: {missing}")
        differently = sorted(n for n, t in run.items() if t["outcome"] in ("failed", "error")
                             and base.get(n, {}).get("outcome") in ("failed", "error") and cause(t)[0] != cause(base[n])[0])
        if differently:
            print("  fail with both, but differently (baseline exception -> mode exception):")
            for name in differently:
                print(f"        {name}: {cause(base[name])[0][:70]!r} -> {cause(run[name])[0][:70]!r} at {cause(run[name])[1][:90]}")
        idle = sorted(n for n, t in run.items() if t["outcome"] == "passed" and base.get(n, {}).get("outcome") == "passed"
                      and t["props"].get("rwsam_trainers") == "0")
        if idle:
            print(f"  passed in both but built no trainer (no evidence): {len(idle)}: " + ", ".join(n.split('::')[1] for n in idle))
    return 0


if __name__ == "__main__":
    sys.exit(main())

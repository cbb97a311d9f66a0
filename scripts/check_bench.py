#!/usr/bin/env python3
"""Turn a pytest-benchmark JSON report into pass/fail against the spec's numbers.

Reads the ``extra_info`` conventions documented in ``benches/conftest.py``
(and ``baselines``, ``{row name: aim ratio or None}``, for a row compared
with several others in its group):
``spec_max_s`` (and ``spec_max`` for non-time metrics) fail the run when
exceeded; ``aim_*`` targets are reported as MISS without failing, because they
depend on the machine. Prints one line per row with throughput and the ratio
to its baseline.

Usage: check_bench.py REPORT.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.2f} us"


def _rate(ops: float, seconds: float) -> str:
    r = ops / seconds if seconds else float("inf")
    if r >= 1e6:
        return f"{r / 1e6:.2f} M/s"
    if r >= 1e3:
        return f"{r / 1e3:.1f} K/s"
    return f"{r:.1f} /s"


def check(report: dict[str, Any]) -> int:
    rows = report.get("benchmarks", [])
    by_name = {b["name"]: b for b in rows}
    failures = 0
    for b in sorted(rows, key=lambda r: (r.get("group") or "", r["name"])):
        info = b.get("extra_info", {})
        mean = b["stats"]["mean"]
        parts = [f"{b.get('group') or '-':40} {b['name']:45} mean {_fmt_time(mean):>10}"]
        ops = info.get("ops")
        if ops:
            parts.append(_rate(ops, mean))
        verdicts: list[str] = []
        base = by_name.get(info.get("baseline", ""))
        if base:
            ratio = base["stats"]["mean"] / mean if mean else float("inf")
            parts.append(f"{ratio:.1f}x vs {base['name']}")
            if "aim_ratio" in info:
                ok = ratio >= info["aim_ratio"]
                verdicts.append(f"aim {info['aim_ratio']}x: {'MET' if ok else 'MISS'}")
        # More baselines in the same group: {name: aim ratio or None (shown only)}.
        for other, aim in (info.get("baselines") or {}).items():
            base = by_name.get(other)
            if not base:
                continue
            ratio = base["stats"]["mean"] / mean if mean else float("inf")
            parts.append(f"{ratio:.2f}x vs {other}")
            if aim is not None:
                verdicts.append(f"aim {aim}x vs {other}: {'MET' if ratio >= aim else 'MISS'}")
        if "spec_max_s" in info:
            ok = mean <= info["spec_max_s"]
            verdicts.append(f"spec < {_fmt_time(info['spec_max_s'])}: {'PASS' if ok else 'FAIL'}")
            failures += not ok
        if "aim_max_s" in info:
            ok = mean <= info["aim_max_s"]
            verdicts.append(f"aim < {_fmt_time(info['aim_max_s'])}: {'MET' if ok else 'MISS'}")
        if "aim_ops_per_s" in info and ops:
            ok = ops / mean >= info["aim_ops_per_s"]
            verdicts.append(f"aim >= {info['aim_ops_per_s']:,}/s: {'MET' if ok else 'MISS'}")
        if "metric" in info and "value" in info:
            value = info["value"]
            parts.append(f"{info['metric']} = {value:.2f}")
            if "spec_max" in info:
                ok = value <= info["spec_max"]
                verdicts.append(f"spec <= {info['spec_max']}: {'PASS' if ok else 'FAIL'}")
                failures += not ok
            if "aim_max" in info:
                ok = value <= info["aim_max"]
                verdicts.append(f"aim <= {info['aim_max']}: {'MET' if ok else 'MISS'}")
        print("  ".join(parts + verdicts))
    print(f"\n{len(rows)} benchmark rows, {failures} over the spec's limits")
    return 1 if failures or not rows else 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f"check_bench: cannot read {argv[1]}: {e}", file=sys.stderr)
        return 2
    return check(report)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

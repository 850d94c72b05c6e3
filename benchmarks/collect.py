"""Gather the parts of a benchmarks/gpu.sh run into one JSON file, and record its rows in RESULTS.md.

    python -m benchmarks.collect part NAME RC SECONDS PARTS_DIR RESULT_JSON   # (gpu.sh, after each part)
    python -m benchmarks.collect record RESULT_JSON                           # append its rows to RESULTS.md

``part`` merges PARTS_DIR/NAME.json (a benchmark's output; NAME_quick.json for --quick runs) or, for the
training smoke runs, every metrics.json under PARTS_DIR/runs/NAME, into RESULT_JSON under "parts", and
prints a one-line JSON summary of the part.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

RUN_KEYS = (
    "status",
    "error",
    "precision",
    "steps",
    "val_loss",
    "best_val_loss",
    "val_accuracy",
    "tokens_per_s",
    "wall_s",
    "overrides",
)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def part(name: str, rc: int, seconds: float, parts_dir: Path, result_json: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"rc": rc, "seconds": round(seconds, 1), "ok": rc == 0}
    bench = next((p for p in (parts_dir / f"{name}.json", parts_dir / f"{name}_quick.json") if p.exists()), None)
    runs = sorted((parts_dir / "runs" / name).rglob("metrics.json")) if (parts_dir / "runs" / name).exists() else []
    summary: dict[str, Any] = {"part": name, "rc": rc, "s": entry["seconds"]}
    if bench is not None:
        entry["result"] = load(bench)
        summary["rows"] = [
            [r["benchmark"].split(" (")[0], r["measured"], r["value"], r["goal"], r["met"]]
            for r in entry["result"].get("rows", [])
            if r["goal"] or "tokens/s" in r["measured"]
        ]
    if runs:
        entry["runs"] = [
            {"dir": str(p.parent.relative_to(parts_dir)), **{k: load(p).get(k) for k in RUN_KEYS}} for p in runs
        ]
        entry["ok"] = entry["ok"] and all(r["status"] == "completed" for r in entry["runs"])
        summary["runs"] = [
            {k: r.get(k) for k in ("dir", "status", "precision", "val_loss", "tokens_per_s", "error")}
            for r in entry["runs"]
        ]
    data = load(result_json)
    data.setdefault("parts", {})[name] = entry
    write(result_json, data)
    return summary


def record(result_json: Path) -> int:
    """Append the rows of every benchmark part of a gpu.sh run to benchmarks/RESULTS.md."""
    from benchmarks.harness import append_rows

    rows = [r for entry in load(result_json).get("parts", {}).values() for r in entry.get("result", {}).get("rows", [])]
    append_rows(rows)
    return len(rows)


def main(argv: list[str]) -> int:
    if argv[:1] == ["part"] and len(argv) == 6:
        name, rc, seconds, parts_dir, result_json = argv[1:]
        print(
            json.dumps(part(name, int(rc), float(seconds), Path(parts_dir), Path(result_json)), default=str), flush=True
        )
        return 0
    if argv[:1] == ["record"] and len(argv) == 2:
        print(f"appended {record(Path(argv[1]))} rows to benchmarks/RESULTS.md")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

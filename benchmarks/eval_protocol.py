"""What the full-resolution evaluation costs against the letterbox one, stage by stage.

For every trained model named (default: every `models` entry of the params file with a trained
model under `train.out`), one `seglab evaluate <model>` process per protocol, as `dvc repro` runs
the stage, the two protocols alternating which goes first; each writes into its own temporary
`evaluate.out`, never the project's. Reports the process's wall and CPU (user + system) time,
images/s (plain and TTA) and mIoU per model and protocol, with `uptime`'s load before and after:
CPU time is the figure to compare when other jobs share the machine.

    .venv/bin/python benchmarks/eval_protocol.py [--params params.yaml] [--models a,b] [--json PATH]

Results: docs/results/eval-protocol.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import machine, versions  # noqa: E402

PROTOCOLS = ("letterbox", "full")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def evaluate(params: Path, model: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from seglab.cli import run; run()", "--params", str(params),
                           "evaluate", model], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"seglab evaluate {model} ({params}) failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"wall_s": round(wall, 1), "cpu_s": round(after.ru_utime - before.ru_utime
                                                     + after.ru_stime - before.ru_stime, 1),
            "miou": out["miou"], "tta_miou": out["tta_miou"],
            "images_per_second": out["images_per_second"], "tta_images_per_second": out["tta_images_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--models", default=None, help="comma-separated model names (default: every trained one)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args()

    settings = yaml.safe_load(args.params.read_text())
    trained = [name for name in settings["models"]
               if (Path(settings["train"]["out"]) / name / "model.keras").is_file()]
    models = args.models.split(",") if args.models else trained
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval-protocol-") as scratch:
        params = {}
        for protocol in PROTOCOLS:
            variant = json.loads(json.dumps(settings))
            variant["evaluate"].update(protocol=protocol, out=str(Path(scratch) / f"eval-{protocol}"))
            params[protocol] = Path(scratch) / f"params-{protocol}.yaml"
            params[protocol].write_text(yaml.safe_dump(variant, sort_keys=False))
        load_before = uptime()
        for index, model in enumerate(models):
            for protocol in PROTOCOLS if index % 2 == 0 else PROTOCOLS[::-1]:
                row = {"model": model, "protocol": protocol, **evaluate(params[protocol], model)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        load_after = uptime()

    print("| model | protocol | CPU s | wall s | images/s | TTA images/s | mIoU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| `{row['model']}` | {row['protocol']} | {row['cpu_s']} | {row['wall_s']} | "
              f"{row['images_per_second']:.1f} | {row['tta_images_per_second']:.1f} | {row['miou']:.4f} |")
    totals = {p: {k: round(sum(r[k] for r in rows if r["protocol"] == p), 1) for k in ("cpu_s", "wall_s")}
              for p in PROTOCOLS}
    for protocol, total in totals.items():
        print(f"| **total** | {protocol} | {total['cpu_s']} | {total['wall_s']} | | | |")
    record = {"benchmark": "eval_protocol", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "machine": machine(), "versions": versions(),
              "load_before": load_before, "load_after": load_after, "rows": rows, "totals": totals}
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

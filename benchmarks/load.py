"""Load: what the shard stage, the warehouse and the dashboard cost at scale (issue 13, item 8).

Three parts, each through the real entry points in fresh processes:

- **shard**: a COCO-layout root of `--images` images (default 20,000; `--val-share` of them in
  val2017) drawn by the embedded sample generator (`seglab sample`, params `sample`; ~25 images/s
  on one core). `--unique-images N` (< `--images`) draws only N and cycles through them
  (`tile_root`: every record with its own id, file (a hard link) and annotation ids), for a quicker
  run with the same per-image work. Then `seglab shard` over it (params `data` / `shard` as in
  params.yaml: workers 2, max_side 320, 16 MB parts). Wall time and peak RSS of each `seglab`
  process (`os.wait4`: the largest of the process and its pool workers), and the shard rate.
- **warehouse**: `--runs` runs (default 3,000: half plain, half TTA, one eval.json per model with
  its two runs, as `data/eval/<name>/eval.json`) written with `tests/factories.py` (the one record
  factory: every record checked by `seglab.records`), VOC-21 classes, a dense 21 x 21 confusion
  matrix, 4 epochs of history per plain run; models span 5 architectures x {real only, dcgan,
  sagan, pix2pix} x seeds, so the replicate and augmenter views have data. Then `seglab ingest`
  into a new warehouse (*full*), again with nothing changed (*unchanged*), and after one new
  model's eval.json is added (*incremental*, 2 runs more).
- **dashboard**: `streamlit run dashboards/app.py -- --warehouse W` (tests/dashboard/browser_support's
  `serve_dashboard`, the README's form) driven by Debian's headless Chromium: per page, the time
  from navigating to the page until its content is there, Streamlit has finished the script and
  every Vega chart on it is drawn (the browser's render, not just the server's script); each page
  cold (first visit: the server's caches empty) then warm (second visit). Then the SQL page's
  first example query, submitted and rendered. Peak RSS of the streamlit server (VmHWM).

Every measurement records the load average (1/5/15 min) before it: the 2 cores are shared.
Prints Markdown tables and the JSON record; `--json PATH` writes the record.

Run from the repository root: `nice -n 10 .venv/bin/python benchmarks/load.py --work /tmp/seglab-load`
(`--parts shard,warehouse,dashboard`; the generated COCO root and eval files are kept in `--work`
and reused by later runs; delete the folder when done).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO), str(Path(__file__).resolve().parent)]

from environment import machine, versions  # noqa: E402

PACKAGES = ("numpy", "pyarrow", "pillow", "pycocotools", "duckdb", "pandas", "streamlit", "altair", "selenium")
ARCHS = ("unet", "attention_unet", "unet_mobilenetv2", "deeplabv3plus_mobilenetv2", "deeplabv3plus_resnet50")
AUGMENTERS = (None, "dcgan", "sagan", "pix2pix")
EPOCHS = 4


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "dashboards"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def timed(argv: list[str], cwd: Path, log: Path) -> dict:
    """Run `argv`; wall seconds, peak RSS (MiB, the process or its largest waited-for child) and load."""
    load = loadavg()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "load": load}


def seglab(params: Path, *stage: str) -> list[str]:
    return [sys.executable, "-m", "seglab.cli", "--params", str(params), *stage]


def write_params(work: Path, part: str, **sections) -> Path:
    """`<work>/params-<part>.yaml`: params.yaml with `sections` merged in (paths absolute, under `work`)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if "out" in sections.get("shard", {}):  # the models' train_data aliases shard.out (&real_shards)
        for model in (*params.get("models", {}).values(), *params.get("more_models", {}).values()):
            if model.get("train_data") == params["shard"]["out"]:
                model["train_data"] = sections["shard"]["out"]
    for name, values in sections.items():
        params[name] = {**params[name], **values}
    path = work / f"params-{part}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# ---- shard --------------------------------------------------------------------------------------


def tile_root(unique: Path, root: Path, counts: dict[str, int]) -> None:
    """A COCO root with `counts` images per folder, cycling through `unique`'s images: each record
    gets its own id and file name (a hard link to the unique JPEG) and its annotations new ids."""
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "annotations").mkdir(parents=True)
    for split_index, (folder, count) in enumerate(counts.items()):
        data = json.loads((unique / "annotations" / f"instances_{folder}.json").read_text())
        by_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        (tmp / folder).mkdir()
        images, annotations = [], []
        for k in range(count):
            source = data["images"][k % len(data["images"])]
            image_id = split_index * 1_000_000 + k + 1
            file_name = f"{image_id:012d}.jpg"
            os.link(unique / folder / source["file_name"], tmp / folder / file_name)
            images.append({**source, "id": image_id, "file_name": file_name})
            annotations += [{**ann, "id": image_id * 100 + ann["id"] % 100, "image_id": image_id}
                            for ann in by_image.get(source["id"], [])]
        data.update(images=images, annotations=annotations)
        (tmp / "annotations" / f"instances_{folder}.json").write_text(json.dumps(data, separators=(",", ":")))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def bench_shard(work: Path, images: int, val_share: float, unique_images: int) -> dict:
    val = max(1, round(images * val_share))
    train = images - val
    unique_val = max(1, round(min(unique_images, images) * val_share))
    unique = work / f"sample-{unique_images}"
    root = unique if unique_images >= images else work / f"coco-{images}-from-{unique_images}"
    params = write_params(
        work, "shard", sample={"out": str(unique), "train_images": min(unique_images, images) - unique_val,
                      "val_images": unique_val},
        data={"root": str(root)}, shard={"out": str(work / "shards")},
        validate_synthetic={"report": str(work / "validate_synthetic")})
    result: dict = {"images": images, "train_images": train, "val_images": val, "unique_images": unique_images}
    if not (unique / "annotations" / "instances_val2017.json").is_file():
        result["sample"] = timed(seglab(params, "sample"), work, work / "sample.log")
    if not (root / "annotations" / "instances_val2017.json").is_file():
        tile_root(unique, root, {"train2017": train, "val2017": val})
    result["annotation_mib"] = round(sum(p.stat().st_size for p in (root / "annotations").glob("*.json")) / 2**20, 1)
    result["shard"] = timed(seglab(params, "shard"), work, work / "shard.log")
    report = json.loads((work / "data" / "reports" / "shard.json").read_text())
    result["shard"]["images_per_second"] = round(images / result["shard"]["seconds"], 1)
    result["shard"]["parts"] = {split: values["shards"] for split, values in report["splits"].items()}
    result["shard_mib"] = round(sum(p.stat().st_size for p in (work / "shards").rglob("*.parquet")) / 2**20, 1)
    shutil.rmtree(work / "shards")
    return result


# ---- warehouse ----------------------------------------------------------------------------------


def _confusion(rng: np.random.Generator, classes: int, quality: float) -> np.ndarray:
    support = rng.integers(2_000, 200_000, size=classes)
    support[0] = 4_000_000
    matrix = np.zeros((classes, classes), np.int64)
    for t in range(classes):
        keep = rng.uniform(quality - 0.15, min(0.98, quality + 0.15))
        matrix[t, t] = int(support[t] * keep)
        others = [p for p in range(classes) if p != t]
        matrix[t, others] = rng.multinomial(support[t] - matrix[t, t], rng.dirichlet(np.ones(len(others))))
    return matrix


def models(count: int) -> list[tuple[str, str, str | None, int]]:
    """`count` model names (arch, augmenter, seed): every architecture x augmenter, seeds 0, 1, ..."""
    out = []
    seed = 0
    while len(out) < count:
        for arch in ARCHS:
            for augmenter in AUGMENTERS:
                name = f"{arch}_s{seed}" + (f"+{augmenter}" if augmenter else "")
                out.append((name, arch, augmenter, seed))
        seed += 1
    return out[:count]


def write_model(eval_dir: Path, name: str, arch: str, augmenter: str | None, seed: int, classes: list[str]) -> Path:
    from tests.factories import eval_entry, eval_run, scores_of, write_eval

    rng = np.random.default_rng(zlib.crc32(name.encode()))
    quality = 0.5 + 0.3 * rng.random() + (0.05 if augmenter else 0.0)
    entries = []
    for variant in ("plain", "tta"):
        matrix = _confusion(rng, len(classes), quality + (0.02 if variant == "tta" else 0.0))
        miou = scores_of(matrix)["means"]["miou"]
        history = [{"epoch": e, "loss": 1.6 - 0.3 * e, "miou": miou * e / EPOCHS, "val_loss": 1.7 - 0.3 * e,
                    "val_miou": miou * (e - 0.5) / EPOCHS, "lr": 1e-3 / e} for e in range(1, EPOCHS + 1)]
        backbone = arch.split("_", 1)[1] if "_" in arch and arch != "attention_unet" else None
        run = eval_run(name, variant, arch=arch, backbone=backbone, weights="imagenet-offline" if backbone else None,
                       weights_loaded="sha256:0123abcd" if backbone else "random", classes=classes,
                       class_set="voc20", dataset="coco", seed=seed, augmenter=augmenter,
                       synthetic_images_used=256 if augmenter else None, epochs_planned=EPOCHS, epochs_run=EPOCHS,
                       best_epoch=EPOCHS, best_val_miou=miou, param_count=int(rng.integers(400_000, 40_000_000)),
                       images_per_second=float(rng.uniform(5, 200)) / (5 if variant == "tta" else 1))
        entries.append(eval_entry(run, matrix, history=history if variant == "plain" else ()))
    return write_eval(eval_dir / name / "eval.json", entries)


def bench_warehouse(work: Path, runs: int) -> dict:
    from seglab.data.classes import VOC20_COCO_NAMES

    classes = ["background", *VOC20_COCO_NAMES]
    eval_dir = work / f"eval-{runs}"
    names = models(runs // 2 + 1)
    base, extra = names[:-1], names[-1]
    started = time.perf_counter()
    for name, arch, augmenter, seed in base:
        if not (eval_dir / name / "eval.json").is_file():
            write_model(eval_dir, name, arch, augmenter, seed, classes)
    shutil.rmtree(eval_dir / extra[0], ignore_errors=True)
    generated_s = time.perf_counter() - started
    warehouse = work / "warehouse.duckdb"
    warehouse.unlink(missing_ok=True)
    params = write_params(work, "warehouse", evaluate={"out": str(eval_dir)}, warehouse={"path": str(warehouse)},
                          validate_synthetic={"report": str(work / "validate_synthetic")})
    result: dict = {"runs": 2 * len(base), "eval_files": len(base), "classes": len(classes),
                    "eval_mib": round(sum(p.stat().st_size for p in eval_dir.rglob("eval.json")) / 2**20, 1),
                    "generate_seconds": round(generated_s, 1)}
    result["full"] = timed(seglab(params, "ingest"), work, work / "ingest-full.log")
    result["unchanged"] = timed(seglab(params, "ingest"), work, work / "ingest-unchanged.log")
    write_model(eval_dir, *extra, classes)
    result["incremental"] = timed(seglab(params, "ingest"), work, work / "ingest-incremental.log")
    result["warehouse_mib"] = round(warehouse.stat().st_size / 2**20, 1)
    import duckdb

    with duckdb.connect(str(warehouse), read_only=True) as con:
        result["rows"] = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                          for t in ("runs", "metrics", "per_class", "confusion", "history")}
    return result


# ---- dashboard ----------------------------------------------------------------------------------

# (page, path, texts that prove its content is there)
PAGES = [
    ("leaderboard", "/", ["Leaderboard", "Runs shown", "mIoU by run", "Accuracy against cost"]),
    ("per_class", "/per-class", ["Per-class scores", "IoU per class and run", "IoU difference per class"]),
    ("runs", "/runs", ["Training curves", "val_miou", "on the diagonal"]),
    ("gan", "/gan", ["Per-class effect of each augmenter", "Change = augmented - baseline"]),
    ("sql", "/sql", ["Start from an example", "Run query", "Tables and columns"]),
]
PAGE_LIMIT_S = 600


def _page_ready(driver, texts: list[str]) -> bool:
    from selenium.webdriver.common.by import By

    body = driver.execute_script("return document.body.innerText")
    if not all(t in body for t in texts):
        return False
    if driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'):
        return False
    if driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'):
        raise RuntimeError(f"Streamlit shows an exception: {body[:2000]}")
    # Every chart container has its canvas / svg drawn.
    return driver.execute_script(
        "const c = [...document.querySelectorAll('[data-testid=\"stVegaLiteChart\"]')];"
        "return c.every(e => e.querySelector('canvas, svg.marks'));")


def _wait(driver, texts: list[str], limit: float = PAGE_LIMIT_S) -> float | None:
    """Seconds until the page is ready; None past `limit`. A browser too busy to answer a probe
    (script timeout) is not ready yet."""
    from selenium.common.exceptions import TimeoutException

    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        try:
            if _page_ready(driver, texts):
                return round(time.perf_counter() - started, 2)
        except TimeoutException:
            pass
        time.sleep(0.1)
    return None


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def bench_dashboard(work: Path) -> dict:
    import psutil

    from tests.dashboard.browser_support import chromium, serve_dashboard

    warehouse = work / "warehouse.duckdb"
    result: dict = {"pages": {}, "load_before": loadavg()}
    # This tree's seglab (the venv may hold another checkout's as an editable install).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGLAB_")} | {"PYTHONPATH": str(REPO / "src")}
    with serve_dashboard(work / "streamlit.log", ["--warehouse", str(warehouse), "--gan-dir", str(work / "gan")],
                         env=env) as url:
        server = next(p for p in psutil.Process().children() if "streamlit" in " ".join(p.cmdline()))
        with chromium(work / "chromium-profile") as driver:
            driver.set_page_load_timeout(PAGE_LIMIT_S)
            driver.set_script_timeout(PAGE_LIMIT_S)
            for visit in ("cold", "warm"):
                for name, path, texts in PAGES:
                    load = loadavg()
                    started = time.perf_counter()
                    try:
                        driver.get(url + path)
                        waited = _wait(driver, texts, PAGE_LIMIT_S - (time.perf_counter() - started))
                        seconds = None if waited is None else round(time.perf_counter() - started, 2)
                        entry = {"seconds": seconds, "load": load}
                    except Exception as e:  # noqa: BLE001 (recorded: a page that fails is a result too)
                        entry = {"seconds": None, "load": load, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    result["pages"].setdefault(name, {})[visit] = entry
                    seconds = entry["seconds"]
                    print(f"{visit} {name}: {seconds} s (load {load})", file=sys.stderr)
            from selenium.webdriver.common.by import By

            driver.get(url + "/sql")
            _wait(driver, ["Run query"])
            load = loadavg()
            started = time.perf_counter()
            driver.find_element(By.XPATH, "//button[.//p[text()='Run query']]").click()
            waited = _wait(driver, ["rows in"])
            result["sql_query"] = {"seconds": None if waited is None else round(time.perf_counter() - started, 2),
                                   "load": load}
        result["server_peak_rss_mib"] = _vm_hwm_mib(server.pid)
    shutil.rmtree(work / "chromium-profile", ignore_errors=True)
    return result


# ---- report -------------------------------------------------------------------------------------


def markdown(record: dict) -> str:
    lines = []
    if "shard" in record:
        s = record["shard"]
        lines += [f"#### shard: {s['images']:,} images ({s['train_images']:,} train + {s['val_images']:,} val, "
                  f"cycling through {s['unique_images']:,} generated ones; {s['annotation_mib']} MiB of annotation "
                  f"JSON, {s['shard_mib']} MiB of shards)", "",
                  "| step | wall s | peak RSS MiB | images/s | load (1/5/15 min) |", "|---|---:|---:|---:|---|"]
        if "sample" in s:
            lines.append(f"| `seglab sample` ({s['unique_images']:,} images) | {s['sample']['seconds']} | "
                         f"{s['sample']['peak_rss_mib']} | {s['unique_images'] / s['sample']['seconds']:.1f} | "
                         f"{s['sample']['load']} |")
        lines += [f"| `seglab shard` (parts: {s['shard']['parts']}) | {s['shard']['seconds']} | "
                  f"{s['shard']['peak_rss_mib']} | {s['shard']['images_per_second']} | {s['shard']['load']} |", ""]
    if "warehouse" in record:
        w = record["warehouse"]
        lines += [f"#### warehouse: {w['runs']:,} runs in {w['eval_files']:,} eval.json ({w['eval_mib']} MiB), "
                  f"{w['classes']} classes; warehouse {w['warehouse_mib']} MiB, rows {w['rows']}", "",
                  "| `seglab ingest` | wall s | peak RSS MiB | load (1/5/15 min) |", "|---|---:|---:|---|"]
        for key, label in (("full", "full (new warehouse)"), ("unchanged", "again, nothing changed"),
                           ("incremental", "one model (2 runs) added")):
            lines.append(f"| {label} | {w[key]['seconds']} | {w[key]['peak_rss_mib']} | {w[key]['load']} |")
        lines.append("")
    if "dashboard" in record:
        d = record["dashboard"]
        lines += [f"#### dashboard (headless Chromium): streamlit server peak RSS {d['server_peak_rss_mib']} MiB", "",
                  "| page | cold s | warm s | load before (cold / warm) |", "|---|---:|---:|---|"]
        def shown(visit: dict) -> str:
            if visit["seconds"] is not None:
                return str(visit["seconds"])
            return visit.get("error", f"> {PAGE_LIMIT_S} (not ready)").split(":")[0]

        for name, visits in d["pages"].items():
            lines.append(f"| {name} | {shown(visits['cold'])} | {shown(visits['warm'])} | "
                         f"{visits['cold']['load']} / {visits['warm']['load']} |")
        lines += [f"| SQL page: first example query | {d['sql_query']['seconds']} | – | {d['sql_query']['load']} |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/seglab-load"), help="scratch folder (kept)")
    parser.add_argument("--parts", default="shard,warehouse,dashboard")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--val-share", type=float, default=0.2)
    parser.add_argument("--unique-images", type=int, default=20_000,
                        help="images the generator draws; fewer than --images: the root cycles through "
                             "them (tile_root)")
    parser.add_argument("--runs", type=int, default=3_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON record here")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {
        "benchmark": "load", "machine": machine(), "versions": versions(PACKAGES),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]), "load_before": loadavg(),
    }
    benches = {"shard": lambda: bench_shard(work, args.images, args.val_share, args.unique_images),
               "warehouse": lambda: bench_warehouse(work, args.runs), "dashboard": lambda: bench_dashboard(work)}
    for part in parts:
        record[part] = benches[part]()
        if args.json:  # what was measured so far survives a later part's failure
            args.json.write_text(json.dumps(record, indent=2) + "\n")
    record["load_after"] = loadavg()
    print(markdown(record))
    print(json.dumps(record, indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

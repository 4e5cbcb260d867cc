"""Data at scale: the prepare stage, `dvc repro` of it and training on thousands of photos,
against the decode limit and Keras's `image_dataset_from_directory`, on the same files and
cores.

    make bench-data       # python benchmarks/data_scale.py [--sizes 5000 20000] [--large]
    python benchmarks/data_scale.py --sizes 200 400 --workdir /tmp/photos   # a quick look

The default sizes take roughly 45 minutes on 2 AVX2 cores (plus the photos, once, when
`--workdir` keeps them): the training steps (small_cnn at 224 px trains at about 10-20
images/s there, compute-bound, so a full epoch of 16,000 images would take half an hour
alone) and prepare, three times per size (plain, then under `dvc repro` with two cache link
types).

A seeded synthetic photo folder (JPEGs of 320-480 x 240-360 pixels, around 400x300: colour
gradients, shapes and sensor-like noise, in `--classes` class folders) is generated once per
size, in worker processes (image i is the same at every size, so the smaller folders are hard
links into the largest). Then, at `--image-size` (224: [224, 224]), for each size:

- decode limit: a bare `multiprocessing.Pool(cores).imap` over the folder's files, Pillow open,
  convert to RGB, resize (bilinear) and `np.asarray`, results discarded: what decoding alone
  costs on these cores. Wall time of its process, start-up included.
- prepare: `python -m pipeline.prepare` in a throwaway project whose params.yaml
  (`data=image_folder`, `model=small_cnn`) points at the folder; wall time of the process, and
  the prepared folder's bytes on disk per image. Paired with the decode limit: each of
  `--rounds` rounds runs both, alternating which goes first; the ratio is the median of the
  rounds' prepare/decode-limit images/s.
- `image_dataset_from_directory`: one pass, batches of 64, same size and interpolation;
  timed from the call to the end of the pass (TensorFlow's import left out).
- training: the train stage's `train()` (model=small_cnn, the trainer's batch size of 128)
  on the stream of the whole training split from the shards `read_split` gives (the seeded
  order of the epoch spans every shard), stopped after `--train-steps` steps (default 40; 0:
  the full epoch) by a Keras callback that sets `model.stop_training` at the end of a batch;
  validation over the first batch of the validation split only (the whole split with
  `--train-steps 0`, as the stage runs it). Timed from the call to its return (tracing and
  the validation included, imports and building the model left out), images/s over the
  images trained; the steady rate (step 2 to the last) is in the notes.
- `dvc repro`: the throwaway project made a Git and DVC repository with a one-stage dvc.yaml,
  the project's prepare stage (`python -m pipeline.prepare`, the photo folder as its dep,
  params `seed` and `data`, the prepared folder as its out), reproduced with `dvc repro
  --force prepare` once with `cache.type copy` (what DVC's default, `reflink,copy`, comes to
  on a file system without reflinks, such as ext4) and once with `cache.type hardlink` (what
  DVC documents for large data), each into an empty cache and with DVC's state database
  (`core.site_cache_dir`) empty, so both hash the photos as a first run does. Wall time and
  peak memory of the `dvc` process tree, its ratio to the plain prepare's wall time, and the
  disk that cache and workspace take together (each inode counted once). `--no-dvc` leaves
  it out.

Each runs as its own process; its peak memory is the largest sum of the resident memory of
the process and its children (its workers), sampled every 0.1 s. Results are appended to
benchmarks/results.md (`--results`, or `--out` as in the other benchmarks); the last line is

    data scale: prepare X.XX of the decode limit; peak memory Y.Y GB at N photos, growth
    Z.ZZx from S to N        (one line)

at the largest size N; the peak is the larger of prepare's and training's, the growth that
peak over the same peak at the smallest size S. 1 GB = 10^9 bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
SIZES = [5_000, 20_000]
LARGE = 50_000
GB = 1e9
SAMPLE_SECONDS = 0.1
DECODE_CHUNK = 16  # files per task of the decode limit, as prepare's workers take them
KERAS_BATCH = 64
WIDTHS, HEIGHTS = (320, 480), (240, 360)
JPEG_QUALITY = 90


# ---------------------------------------------------------------- the synthetic photo folder

def photo_path(folder: Path, i: int, classes: int) -> Path:
    return folder / f"class{i % classes:02d}" / f"photo{i:06d}.jpg"


def make_photo(seed: int, i: int, classes: int) -> np.ndarray:
    """Photo `i` as uint8 (height, width, 3): a colour gradient whose hues lean to the class,
    a few filled shapes, and noise, so that JPEG sizes are those of real photos."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, i])
    width, height = int(rng.integers(*WIDTHS, endpoint=True)), int(
        rng.integers(*HEIGHTS, endpoint=True))
    cls = i % classes
    hue = np.array([np.cos(2 * np.pi * (cls / classes + k / 3)) for k in range(3)])
    ys, xs = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
    gradient = (128 + 60 * hue + rng.uniform(-60, 60, 3) * xs + rng.uniform(-60, 60, 3) * ys)
    image = Image.fromarray(np.clip(gradient, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
        colour = tuple(int(v) for v in np.clip(128 + 100 * hue + rng.normal(0, 50, 3), 0, 255))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif shape == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([tuple(int(v) for v in p) for p in
                          rng.integers([0, 0], [width, height], size=(int(rng.integers(3, 7)), 2))],
                         fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3),
                                                              dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _write_photos(task: tuple[str, int, int, int, int]) -> int:
    """Write photos [start, stop) of the folder; returns their bytes."""
    from PIL import Image

    folder, seed, classes, start, stop = task
    written = 0
    for i in range(start, stop):
        path = photo_path(Path(folder), i, classes)
        Image.fromarray(make_photo(seed, i, classes)).save(path, quality=JPEG_QUALITY)
        written += path.stat().st_size
    return written


def photo_folder(work: Path, count: int, seed: int, classes: int, cores: int) -> Path:
    """The folder of `count` photos under `work`, made unless a complete one is there: hard
    links into a larger folder of the same seed and classes when there is one, else written
    by `cores` processes."""
    spec = {"count": count, "seed": seed, "classes": classes, "widths": list(WIDTHS),
            "heights": list(HEIGHTS), "quality": JPEG_QUALITY}
    name = f"photos-{count}-seed{seed}-classes{classes}"
    folder, marker = work / name, work / f"{name}.json"
    if marker.is_file() and spec_of(marker) == spec:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for c in range(classes):
        (folder / f"class{c:02d}").mkdir(parents=True)
    larger = sorted((spec_of(m)["count"], m.with_suffix(""))
                    for m in work.glob(f"photos-*-seed{seed}-classes{classes}.json")
                    if spec_of(m)["count"] > count and {**spec_of(m), "count": count} == spec)
    started = time.perf_counter()
    if larger:
        source = larger[0][1]
        for i in range(count):
            link(photo_path(source, i, classes), photo_path(folder, i, classes))
        how = f"linked from {source.name}"
    else:
        import multiprocessing

        step = 64
        tasks = [(str(folder), seed, classes, s, min(s + step, count))
                 for s in range(0, count, step)]
        with multiprocessing.get_context("fork").Pool(cores) as pool:
            total = sum(pool.imap_unordered(_write_photos, tasks))
        how = (f"written by {cores} processes, {total / count / 1e3:.0f} kB per JPEG on "
               "average")
    marker.write_text(json.dumps(spec))
    print(f"{count} photos in {folder} ({how}, {time.perf_counter() - started:.0f} s)",
          flush=True)
    return folder


def spec_of(marker: Path) -> dict:
    """What a folder's marker file says it holds: count, seed, classes, sizes, quality."""
    return json.loads(marker.read_text())


def link(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def folder_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.jpg"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------- measured child processes

def child_env() -> dict[str, str]:
    """The environment of the measured processes: this checkout importable, and this Python's
    folder first on PATH (so that `dvc` and the `python` of a DVC stage are this venv's)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent),
                                                env.get("PATH")]))
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def tree_rss(process) -> int:
    """Resident bytes of `process` and all its descendants now."""
    import psutil

    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def measured(cmd: list[str], cwd: Path, label: str) -> dict:
    """Run `cmd`; its wall seconds, the peak resident bytes of its process tree, and the JSON
    object on its last line of output, if any.

    Raises:
        SystemExit: the command failed (its output is printed).
    """
    import psutil

    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        process, peak = psutil.Process(proc.pid), 0
        while True:
            peak = max(peak, tree_rss(process))
            try:
                proc.wait(timeout=SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                continue
        seconds = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        print(output, file=sys.stderr)
        sys.exit(f"data scale: {label} failed (exit {proc.returncode}): {' '.join(cmd)}")
    result: dict = {}
    lines = output.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        result = json.loads(lines[-1])
    return {"seconds": seconds, "peak": peak, "output": output, **result}


def child(kind: str, **spec) -> list[str]:
    return [sys.executable, str(SCRIPT), "--child", kind, json.dumps(spec)]


def _decode_one(task: tuple[list[str], int]) -> None:
    from PIL import Image

    paths, size = task
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def decode_limit_child(folder: str, size: int, workers: int) -> dict:
    """The bare decode: Pillow in a `multiprocessing.Pool`, results discarded."""
    import multiprocessing

    files = [str(p) for p in folder_files(Path(folder))]
    tasks = [(files[i:i + DECODE_CHUNK], size) for i in range(0, len(files), DECODE_CHUNK)]
    with multiprocessing.Pool(workers) as pool:
        for _ in pool.imap(_decode_one, tasks):
            pass
    return {"images": len(files)}


def keras_dataset_child(folder: str, size: int, seed: int) -> dict:
    # isort: off
    import pipeline  # noqa: F401  (first: it quiets TensorFlow's start-up log)
    # isort: on
    import keras

    started = time.perf_counter()
    dataset = keras.utils.image_dataset_from_directory(
        folder, image_size=(size, size), batch_size=KERAS_BATCH, shuffle=False, seed=seed,
        interpolation="bilinear", verbose=False)
    images = 0
    for x, _ in dataset:
        images += int(x.shape[0])
    return {"images": images, "timed": time.perf_counter() - started}


def stop_fit_after(model, steps: int):
    """Make `model.fit` stop after `steps` training steps: a Keras callback, added to the
    callbacks the caller gives, sets `model.stop_training` at the end of the step (Keras
    then ends the epoch, validates and returns). Returns the callback, which keeps the time
    at the end of each step. The train stage's code is left as it is."""
    import keras

    class StopAfter(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            if steps and len(self.ends) >= steps:
                self.model.stop_training = True

    stopper, fit = StopAfter(), model.fit

    def fit_with_stopper(*args, callbacks=None, **kwargs):
        return fit(*args, callbacks=[*(callbacks or []), stopper], **kwargs)

    object.__setattr__(model, "fit", fit_with_stopper)  # past Keras's attribute tracking
    return stopper


def train_child(steps: int) -> dict:
    """The train stage's `train()` for `steps` steps (0: one epoch) on the stream of the whole
    training split of the prepared shards of the project in the current folder."""
    import pipeline  # noqa: F401  (first: it quiets TensorFlow's start-up log)
    from pipeline import backend
    from pipeline.build import model_from_config
    from pipeline.config import load_params
    from pipeline.prepare import read_meta, read_split
    from pipeline.train import train

    cfg = load_params()
    backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
    prepared = Path.cwd() / cfg.paths.prepared
    model = model_from_config(cfg.model, read_meta(prepared), cfg.augment)
    batch_size = cfg.trainer.batch_size
    train_data, val_data = read_split(prepared, "train"), read_split(prepared, "val")
    epoch_steps = -(-len(train_data[1]) // batch_size)
    limited = 0 < steps < epoch_steps
    if limited:  # validation over one batch: the measurement is the training steps
        val_data = (val_data[0].subset(np.arange(min(batch_size, len(val_data[1])))),
                    val_data[1][:batch_size])
    stopper = stop_fit_after(model, steps if limited else 0)
    started = time.perf_counter()
    train(model, train_data, val_data, cfg.optimizer, 1, batch_size, seed=cfg.seed,
          jit_compile=cfg.trainer.jit_compile, precise_bn=cfg.trainer.precise_bn)
    timed = time.perf_counter() - started
    done = len(stopper.ends)
    images = done * batch_size if limited else len(train_data[1])
    ends = stopper.ends
    steady = ((done - 1) * batch_size / (ends[-1] - ends[0])
              if limited and done > 1 and ends[-1] > ends[0] else None)
    return {"images": images, "steps": done, "epoch_steps": epoch_steps,
            "split_images": len(train_data[1]), "val_images": len(val_data[1]),
            "batch_size": batch_size, "timed": timed, "steady": steady}


def run_child(argv: list[str]) -> None:
    kind, spec = argv[0], json.loads(argv[1])
    result = {"decode": decode_limit_child, "keras": keras_dataset_child,
              "train": train_child}[kind](**spec)
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- one size

def write_project(project: Path, folder: Path, size: int, workers: int | None) -> None:
    """A throwaway project: params.yaml for the image folder, relative output paths."""
    from pipeline.params import write_params

    project.mkdir(parents=True, exist_ok=True)
    overrides = ["data=image_folder", f"data.path={folder}", f"data.image_size=[{size},{size}]",
                 "data.limit=null", "model=small_cnn",
                 f"data.workers={'null' if workers is None else workers}"]
    cfg = write_params(overrides, project / "params.yaml")
    for key, value in vars(cfg.paths).items():
        if Path(value).is_absolute():
            sys.exit(f"data scale: paths.{key}={value} is absolute; the benchmark writes its "
                     "outputs into a throwaway project and needs relative paths")


def measure_size(count: int, folder: Path, project: Path, args, cores: int,
                 keras_ok: bool) -> dict:
    size, workers = args.image_size, args.workers or cores
    write_project(project, folder, size, args.workers)
    from pipeline.config import load_params

    prepared = project / load_params(project / "params.yaml").paths.prepared
    ways: dict[str, list[dict]] = {"decode": [], "prepare": []}
    for r in range(args.rounds):
        for way in (("decode", "prepare") if r % 2 == 0 else ("prepare", "decode")):
            if way == "decode":
                got = measured(child("decode", folder=str(folder), size=size, workers=workers),
                               project, "the decode limit")
            else:
                got = measured([sys.executable, "-m", "pipeline.prepare"], project, "prepare")
                got["images"] = count
                got["disk"] = folder_bytes(prepared)
            got["rate"] = got["images"] / got["seconds"]
            ways[way].append(got)
            print(f"{count} photos, round {r + 1}: {way:7s} {got['rate']:7.0f} images/s, "
                  f"peak memory {got['peak'] / GB:.2f} GB, {got['seconds']:.1f} s", flush=True)
    ratios = [p["rate"] / d["rate"] for d, p in zip(ways["decode"], ways["prepare"])]
    result = {"count": count, "ratio": statistics.median(ratios),
              "decode": summary(ways["decode"]), "prepare": summary(ways["prepare"])}
    result["prepare"]["disk"] = ways["prepare"][-1]["disk"] / count
    result["source"] = folder_bytes(folder) / count
    if keras_ok:
        got = measured(child("keras", folder=str(folder), size=size, seed=args.seed), project,
                       "image_dataset_from_directory")
        got["rate"] = got["images"] / got["timed"]
        result["keras"] = summary([got])
        print(f"{count} photos: image_dataset_from_directory {got['rate']:7.0f} images/s, "
              f"peak memory {got['peak'] / GB:.2f} GB", flush=True)
    got = measured(child("train", steps=args.train_steps), project, "the training steps")
    got["rate"] = got["images"] / got["timed"]
    result["train"] = {**summary([got]), **{k: got[k] for k in (
        "images", "steps", "epoch_steps", "split_images", "steady")},
        "val": got["val_images"], "batch": got["batch_size"]}
    print(f"{count} photos: training {got['rate']:7.0f} images/s ({got['steps']} steps of "
          f"{got['batch_size']}, {got['images']} images, over the stream of the full split of "
          f"{got['split_images']}), peak memory {got['peak'] / GB:.2f} GB", flush=True)
    shutil.rmtree(prepared, ignore_errors=True)
    if args.dvc:
        result["dvc"] = dvc_repro_runs(project, folder, prepared, count)
    return result


# ---------------------------------------------------------------- prepare under dvc repro

DVC_LINKS = ("copy", "hardlink")


def dvc_command() -> str | None:
    """This venv's `dvc`, else the one on PATH, else None."""
    mine = Path(sys.executable).with_name("dvc")
    return str(mine) if mine.is_file() else shutil.which("dvc")


def disk_bytes(*folders: Path) -> int:
    """Bytes allocated on disk to the files under `folders`, each inode counted once (a hard
    link into the cache takes no more room)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder in folders:
        for path in Path(folder).rglob("*"):
            info = path.lstat()
            if path.is_file() and not path.is_symlink() and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def dvc_repro_runs(project: Path, folder: Path, prepared: Path, count: int) -> dict:
    """`dvc repro --force prepare` in `project`, made a Git and DVC repository with the prepare
    stage, once per cache link type in DVC_LINKS, each into an empty cache and an empty state
    database; per link type its wall time, peak memory and the disk cache and workspace
    take."""
    dvc = dvc_command()
    env = child_env()

    def quiet(*cmd: str) -> None:
        done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"data scale: {' '.join(cmd)} failed in {project}:\n"
                     f"{done.stdout}{done.stderr}")

    quiet("git", "init", "-q")
    quiet(dvc, "init", "-q")
    out = prepared.relative_to(project).as_posix()
    (project / "dvc.yaml").write_text(
        "# the project's prepare stage (its code deps left out: the package is installed)\n"
        "stages:\n"
        "  prepare:\n"
        "    cmd: python -m pipeline.prepare\n"
        f"    deps:\n      - {json.dumps(str(folder))}\n"  # a JSON string is YAML
        "    params:\n      - seed\n      - data\n"
        f"    outs:\n      - {json.dumps(out)}\n")
    cache, site = project / ".dvc" / "cache", project / ".dvc" / "tmp" / "site-cache"
    runs = {}
    for link in DVC_LINKS:
        for path in (cache, site, prepared):
            shutil.rmtree(path, ignore_errors=True)
        (project / "dvc.lock").unlink(missing_ok=True)
        quiet(dvc, "config", "cache.type", link)
        quiet(dvc, "config", "core.site_cache_dir", str(site))
        got = measured([dvc, "repro", "--force", "prepare"], project,
                       f"dvc repro prepare (cache.type {link})")
        got["disk"] = disk_bytes(prepared, cache)
        got["rate"] = count / got["seconds"]
        runs[link] = {"rate": got["rate"], "wall": got["seconds"], "peak": got["peak"],
                      "disk": got["disk"]}
        print(f"{count} photos: dvc repro prepare, cache.type {link:8s} {got['rate']:7.0f} "
              f"images/s, {got['seconds']:.1f} s, peak memory {got['peak'] / GB:.2f} GB, "
              f"cache + workspace {got['disk'] / GB:.2f} GB", flush=True)
    for path in (cache, site, prepared):
        shutil.rmtree(path, ignore_errors=True)
    return runs


def summary(runs: list[dict]) -> dict:
    """Median images/s and largest peak memory over the runs."""
    return {"rate": statistics.median(r["rate"] for r in runs),
            "wall": statistics.median(r["seconds"] for r in runs),
            "peak": max(r["peak"] for r in runs)}


# ---------------------------------------------------------------- the report

def machine_peak(result: dict) -> float:
    """The larger of prepare's and training's peak memory."""
    return max(result["prepare"]["peak"], result["train"]["peak"])


def report(results: list[dict], args, cores: int, command: str) -> list[str]:
    import keras
    import psutil

    from pipeline.backend import cpu_description

    first, last = results[0], results[-1]
    growth = machine_peak(last) / machine_peak(first)
    workers = args.workers or cores
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, data scale, "
        f"{cpu_description()}, {cores} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"Keras {keras.__version__} ({keras.backend.backend()})",
        "",
        f"`{command}` (synthetic JPEGs of {WIDTHS[0]}-{WIDTHS[1]} x {HEIGHTS[0]}-{HEIGHTS[1]} "
        f"px in {args.classes} classes, prepared at {args.image_size}x{args.image_size}, "
        f"{workers} decoding processes; decode limit and prepare: wall time of the process, "
        f"paired over {args.rounds} round(s), the ratio the median of the rounds'; "
        "image_dataset_from_directory: one pass, batches of 64, timed from the call to the "
        f"end of the pass; training: {train_what(args, last)}, timed from the call to its "
        "return; dvc repro: `dvc repro --force prepare` in the throwaway project made a DVC "
        "repository, into an empty cache of the link type named, state database empty, its "
        "on-disk column the cache and the workspace together, each inode once; "
        "the wall time is the whole process's, start-up included; "
        "peak memory: the process and its workers, resident, 1 GB = 10^9 bytes)",
        "",
        "| photos | way | images/s | process wall time | peak memory | on disk per image |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for result in results:
        n = result["count"]
        rows = [("decode limit (Pillow, multiprocessing.Pool)", result["decode"],
                 f"{result['source'] / 1e3:.0f} kB JPEG"),
                ("prepare", result["prepare"], f"{result['prepare']['disk'] / 1e3:.1f} kB")]
        if "keras" in result:
            rows.append(("image_dataset_from_directory", result["keras"], "-"))
        trained = result["train"]
        rows.append((f"training, {trained['steps']} steps ({trained['images']} images) over "
                     f"the stream of the full split ({trained['split_images']} images)"
                     if trained["steps"] < trained["epoch_steps"] else
                     f"training epoch ({trained['images']} images)", trained, "-"))
        for link, got in result.get("dvc", {}).items():
            rows.append((f"dvc repro prepare, cache.type {link}", got,
                         f"{got['disk'] / n / 1e3:.1f} kB"))
        for way, got, disk in rows:
            lines.append(f"| {n} | {way} | {got['rate']:.0f} | {got['wall']:.1f} s | "
                         f"{got['peak'] / GB:.2f} GB | {disk} |")
    lines.append("")
    for result in results:
        lines.append(f"- {result['count']} photos: prepare {result['ratio']:.2f} of the "
                     "decode limit")
    for result in results:
        trained = result["train"]
        if trained["steady"]:
            lines.append(f"- {result['count']} photos: training {trained['steady']:.1f} "
                         f"images/s from the end of step 1 to the end of step "
                         f"{trained['steps']} (first step's tracing left out); "
                         f"{trained['steps']} of the epoch's {trained['epoch_steps']} steps, "
                         "not a full epoch")
    for result in results:
        if "dvc" in result:
            plain = result["prepare"]["wall"]
            lines.append(f"- {result['count']} photos: `dvc repro` / plain prepare, wall time: "
                         + ", ".join(f"{got['wall'] / plain:.2f} with cache.type {link} "
                                     f"({got['wall']:.1f} s against {plain:.1f} s; cache + "
                                     f"workspace {got['disk'] / GB:.2f} GB)"
                                     for link, got in result["dvc"].items()))
    lines.append(f"- peak memory growth from {first['count']} to {last['count']} photos: "
                 f"prepare {last['prepare']['peak'] / first['prepare']['peak']:.2f}x, training "
                 f"{last['train']['peak'] / first['train']['peak']:.2f}x")
    lines += ["", final_line(results, growth), ""]
    return lines


def train_what(args, last: dict) -> str:
    """What the training row measures, for the table's preamble."""
    batch = last["train"]["batch"]
    if args.train_steps == 0:
        return (f"one epoch of `train()` with model=small_cnn, batch {batch}, validation as "
                "the stage runs it")
    return (f"`train()` with model=small_cnn, batch {batch}, stopped after "
            f"{args.train_steps} steps (a Keras callback setting `model.stop_training`) of the "
            "seeded stream over the full training split, not a full epoch, where the split "
            "holds more steps; validation over one batch")


def final_line(results: list[dict], growth: float) -> str:
    first, last = results[0], results[-1]
    return (f"data scale: prepare {last['ratio']:.2f} of the decode limit; peak memory "
            f"{machine_peak(last) / GB:.1f} GB at {last['count']} photos, growth "
            f"{growth:.2f}x from {first['count']} to {last['count']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, metavar="N",
                        help="numbers of photos (default: 5000 20000)")
    parser.add_argument("--large", action="store_true", help=f"add {LARGE} photos")
    parser.add_argument("--image-size", type=int, default=224, metavar="PX",
                        help="data.image_size, square (default 224)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes (data.workers); default: every core")
    parser.add_argument("--rounds", type=int, default=1,
                        help="paired decode-limit/prepare rounds per size (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=40, metavar="N",
                        help="training steps (batches of 128) over the stream of the full "
                             "training split (default 40; 0: one full epoch)")
    parser.add_argument("--no-dvc", dest="dvc", action="store_false",
                        help="leave out prepare under `dvc repro` (copy and hardlink caches)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the photo folders here and reuse them (default: a temporary "
                             "folder, removed)")
    parser.add_argument("--results", "--out", dest="results", type=Path,
                        default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes + ([LARGE] if args.large else [])))
    if min(sizes) < 5 * args.classes:
        parser.error(f"--sizes: at least {5 * args.classes} photos (5 per class), so that each "
                     "split holds every class")
    if args.rounds < 1 or args.image_size < 8 or args.train_steps < 0:
        parser.error("--rounds at least 1, --image-size at least 8, --train-steps at least 0")
    if args.dvc and (dvc_command() is None or shutil.which("git") is None):
        print("data scale: no dvc or no git, so no dvc repro rows", flush=True)
        args.dvc = False
    cores = len(os.sched_getaffinity(0))
    keras_ok = importlib.util.find_spec("tensorflow") is not None
    if not keras_ok:
        print("data scale: no TensorFlow, so no image_dataset_from_directory row", flush=True)
    command = " ".join(["python benchmarks/data_scale.py", "--sizes", *map(str, args.sizes),
                        *(["--large"] if args.large else []),
                        *([] if args.image_size == 224 else ["--image-size",
                                                             str(args.image_size)]),
                        *([] if args.classes == 10 else ["--classes", str(args.classes)]),
                        *([] if args.workers is None else ["--workers", str(args.workers)]),
                        *([] if args.rounds == 1 else ["--rounds", str(args.rounds)]),
                        *([] if args.seed == 0 else ["--seed", str(args.seed)]),
                        *([] if args.train_steps == 40 else ["--train-steps",
                                                             str(args.train_steps)]),
                        *([] if args.dvc else ["--no-dvc"])])
    scratch = Path(tempfile.mkdtemp(prefix="data-scale-"))
    work = args.workdir or scratch
    work.mkdir(parents=True, exist_ok=True)
    try:
        folders = {n: photo_folder(work, n, args.seed, args.classes, cores)
                   for n in sorted(sizes, reverse=True)}
        results = [measure_size(n, folders[n], scratch / f"project-{n}", args, cores, keras_ok)
                   for n in sizes]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = report(results, args, cores, command)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[4:-3]))
    print(f"results appended to {args.results}")
    print(lines[-2])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) > 2 and sys.argv[1] == "--child":  # one measured process
        run_child(sys.argv[2:])
    else:
        main()

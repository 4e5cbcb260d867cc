"""The benchmark scripts run end to end on tiny settings and print what the README quotes.

The figures themselves come from full runs (benchmarks/results.md); these tests keep the
scripts working: `make bench`'s ratio line, the interleaved training-options table, the
time-to-accuracy report read back from MLflow and `make bench-data`'s closing line.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO, run


@pytest.mark.slow
def test_bench_ends_with_the_pipeline_over_bare_ratio(tmp_path, data_dir):
    out = tmp_path / "results.md"
    result = run(["python", "benchmarks/throughput.py", "--rounds", "1", "--epochs", "1",
                  "--images", "512", "--out", str(out)], REPO, timeout=300)
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"pipeline/bare throughput ratio: \d+\.\d\d", last), result.stdout
    ratio = float(last.rsplit(" ", 1)[1])
    assert 0 < ratio < 10
    recorded = out.read_text()
    assert "`python benchmarks/throughput.py --rounds 1 --epochs 1 --images 512`" in recorded
    assert re.search(r"\| pipeline train stage \| \d+ \| \d+\.\d\d s \| \d+ ms \|", recorded)
    bare = re.findall(r"^\| bare (arrays|tf\.data|PyDataset) `model\.fit`( \(the baseline\))? "
                      r"\| (\d+) \|", recorded, re.MULTILINE)
    assert [way for way, _, _ in bare] == ["arrays", "tf.data", "PyDataset"], recorded
    rates = {way: int(rate) for way, _, rate in bare}
    assert [way for way, chosen, _ in bare if chosen] == [max(rates, key=rates.get)]
    assert last in recorded


@pytest.mark.slow
def test_training_options_interleave_the_two_ways_and_record_a_row_each(tmp_path, data_dir):
    out = tmp_path / "results.md"
    result = run(["python", "benchmarks/training_options.py", "--compare", "input", "precision",
                  "--rounds", "2", "--images", "512", "--out", str(out)], REPO, timeout=300)
    for name in ("input", "precision"):
        rounds = re.findall(rf"^{name} round (\d): A (\d+)  B (\d+) images/s  B/A (\d+\.\d\d)$",
                            result.stdout, re.MULTILINE)
        assert [r[0] for r in rounds] == ["1", "2"], result.stdout
        for _, a, b, ratio in rounds:
            assert float(ratio) == pytest.approx(int(b) / int(a), abs=0.02)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| input")
            or line.startswith("| precision")]
    assert len(rows) == 2
    assert re.fullmatch(r"\| precision: precision=float32 \(A\) vs precision=mixed_bfloat16 "
                        r"\(B\) \| \d+ \| \d+ \| \d+\.\d\d \| \d+\.\d\d to \d+\.\d\d \|", rows[1])


@pytest.mark.slow
def test_training_options_refuse_xla_under_op_determinism(tmp_path, data_dir):
    out = tmp_path / "results.md"
    result = run(["python", "benchmarks/training_options.py", "--compare", "jit",
                  "--out", str(out)], REPO, check=False, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: trainer.jit_compile=true: TensorFlow does not compile with XLA under op "
        "determinism (trainer.deterministic=true); add trainer.deterministic=false to train "
        "with XLA")
    assert not out.exists()


@pytest.mark.slow
def test_time_to_accuracy_counts_training_time_in_epochs_of_the_default(tmp_path, data_dir):
    out = tmp_path / "results.md"
    result = run(["python", "benchmarks/time_to_accuracy.py", "quick", "data.limit=300",
                  "quick:trainer.batch_size=64", "evaluate.tta=flip", "--seeds", "1",
                  "--out", str(out)], REPO, timeout=600)
    recorded = out.read_text()
    duration = r"(\d+\.\d s|\d+ min \d\d s)"
    unit = re.search(rf"^\| 1 \| default, 1 epoch \(the unit\) \| 0\.\d{{4}} \| 0\.\d{{4}} \| "
                     rf"{duration} \| 1 \| 1\.00 \|$", recorded, re.MULTILINE)
    assert unit, result.stdout
    rows = {}
    for label in ("experiment=quick", "experiment=quick trainer.batch_size=64"):
        rows[label] = re.search(
            rf"^\| 1 \| {label} \| (0\.\d{{4}}) \| (0\.\d{{4}}) \| {duration} \| (\d+) \| "
            r"(\d+\.\d\d) \|$", recorded, re.MULTILINE)
        assert rows[label], recorded
        assert float(rows[label].group(5)) > 0
    plain, variant = rows.values()
    last = result.stdout.strip().splitlines()[-1]
    summary = re.fullmatch(r"time to accuracy: quick (0\.\d{4}) in (\d+\.\d) default epochs; "
                           r"quick:trainer\.batch_size=64 (0\.\d{4}) in (\d+\.\d) default epochs",
                           last)
    assert summary, last
    assert summary.group(1) == plain.group(1) and summary.group(3) == variant.group(1)
    # The table keeps two decimals and the last line one, both rounded from the same figure.
    for row, equivalents in ((plain, summary.group(2)), (variant, summary.group(4))):
        assert abs(float(equivalents) - float(row.group(5))) <= 0.05 + 0.005, (last, recorded)
    assert last in recorded
    assert "`python benchmarks/time_to_accuracy.py quick quick:trainer.batch_size=64 " \
        "data.limit=300 evaluate.tta=flip --seeds 1`" in recorded


def test_time_to_accuracy_refuses_an_unknown_preset(tmp_path):
    result = run(["python", "benchmarks/time_to_accuracy.py", "fastest", "--out",
                  str(tmp_path / "results.md")], REPO, check=False, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: no preset conf/experiment/fastest.yaml; name one of best, ")
    assert not (tmp_path / "results.md").exists()


@pytest.mark.slow
def test_data_scale_ends_with_the_decode_limit_and_memory_line(tmp_path):
    out = tmp_path / "results.md"
    result = run(["python", "benchmarks/data_scale.py", "--sizes", "40", "400", "--classes", "4",
                  "--image-size", "32", "--train-steps", "2", "--workdir", str(tmp_path / "work"),
                  "--results", str(out)], REPO, timeout=600)
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"data scale: prepare \d+\.\d\d of the decode limit; peak memory "
                        r"\d+\.\d GB at 400 photos, growth \d+\.\d\dx from 40 to 400", last), \
        result.stdout
    recorded = out.read_text()
    assert ("`python benchmarks/data_scale.py --sizes 40 400 --image-size 32 --classes 4 "
            "--train-steps 2`" in recorded)
    row = r"\| \d+ \| \d+\.\d s \| \d+\.\d\d GB \| "
    ways = [r"decode limit \(Pillow, multiprocessing\.Pool\)", "prepare",
            "image_dataset_from_directory", "dvc repro prepare, cache.type copy",
            "dvc repro prepare, cache.type hardlink"]
    for photos in (40, 400):
        for way in ways:
            assert re.search(rf"^\| {photos} \| {way} {row}", recorded, re.MULTILINE), \
                (photos, way, recorded)
    # 40 photos: one batch is the whole epoch; 400: 2 of the epoch's 3 steps of 128
    assert re.search(rf"^\| 40 \| training epoch \(\d+ images\) {row}", recorded, re.MULTILINE)
    assert re.search(rf"^\| 400 \| training, 2 steps \(256 images\) over the stream of the "
                     rf"full split \(\d+ images\) {row}", recorded, re.MULTILINE), recorded
    assert re.search(r"^- 400 photos: training \d+\.\d images/s .* 2 of the epoch's 3 steps, "
                     r"not a full epoch$", recorded, re.MULTILINE), recorded
    # 32x32x3 uint8 pixels per image, plus the shards' headers and the labels
    disk = re.search(r"^\| 400 \| prepare \| .* \| (\d+\.\d) kB \|$", recorded, re.MULTILINE)
    assert 3.0 < float(disk.group(1)) < 3.5
    # the copy cache holds the shards twice over; hard links once
    on_disk = {link: float(re.search(rf"^\| 400 \| dvc repro prepare, cache.type {link} \| .* "
                                     r"\| (\d+\.\d) kB \|$", recorded, re.MULTILINE).group(1))
               for link in ("copy", "hardlink")}
    assert on_disk["copy"] > 1.7 * on_disk["hardlink"], on_disk
    assert re.search(r"^- 400 photos: `dvc repro` / plain prepare, wall time: \d+\.\d\d with "
                     r"cache.type copy .*, \d+\.\d\d with cache.type hardlink ", recorded,
                     re.MULTILINE), recorded
    assert last in recorded


@pytest.mark.slow
def test_search_pruning_ends_with_the_time_ratio_and_both_best_values(tmp_path, data_dir):
    out = tmp_path / "results.md"
    result = run(["python", "benchmarks/search_pruning.py", "--trials", "1", "--limit", "200",
                  "--epochs", "1", "--out", str(out), "model=small_cnn"], REPO, timeout=600)
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"search: pruning took \d+\.\d\d of the time, best val_accuracy "
                        r"\d\.\d{4} vs \d\.\d{4}", last), result.stdout
    recorded = out.read_text()
    for pruner in ("median", "none"):
        assert re.search(rf"^\| {pruner} \| \d+ \| \d\.\d{{4}} \| 0 of 1 \| 1 \|$", recorded,
                         re.MULTILINE), recorded
    assert last in recorded

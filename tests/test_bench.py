"""The shipped benchmark runs and reports every case (timings are its output, never asserted)."""

import json

from capsnet.tools.bench import main


def test_bench_reports_every_case_with_ratios_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = main(["--device", "cpu", "--batch-sizes", "2", "--infer-batch", "2", "--iters", "1,3",
                 "--steps", "1", "--warmup", "0", "--memory", "inline", "--json", str(out)])
    cases = {(r["case"], r["mode"], r["iters"]) for r in rows}
    assert cases == {("conv-only", "train", None), ("capsnet", "train", 3), ("naive", "train", 3),
                     ("conv-only", "infer", None), ("capsnet", "infer", 3), ("naive", "infer", 3),
                     ("capsnet", "train", 1)}
    for r in rows:
        assert r["images_per_second"] > 0 and r["ms_per_step"] > 0
        if r["case"] == "conv-only":
            assert r["vs_conv_bound"] == 1.0
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["meta"]["threads"] >= 1
    table = capsys.readouterr().out
    assert "| capsnet | train | 2 | 3 |" in table and "x conv bound" in table


def test_fresh_process_memory_measurement_returns_a_figure():
    from capsnet.tools.bench import fresh_peak_mb, parse_args

    peak = fresh_peak_mb(("capsnet", True, 2, 1), parse_args(["--device", "cpu"]))
    assert peak is not None and peak > 0

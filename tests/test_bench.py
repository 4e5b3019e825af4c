"""The benchmark's machinery: fresh processes, rounds, ratios, the docs table, --compare (timings are its
output, never asserted)."""

import json
import os
import statistics

import pytest

from capsnet.errors import CapsnetError
from capsnet.tools.bench import main, parse_args, plan, run_fresh
from capsnet.tools.bench_machine import FLAGS, cpu_info, gemm_gflops
from capsnet.tools.bench_report import BEGIN, END


def test_one_case_is_timed_in_a_fresh_process():
    case = {"case": "conv-only", "mode": "infer", "batch": 2, "iters": None, "amp": "off"}
    row = run_fresh(case, parse_args(["--device", "cpu", "--warmup", "0", "--steps", "1"]))
    assert row is not None and row["pid"] != os.getpid()
    assert {k: row[k] for k in case} == case
    assert row["images_per_second"] > 0 and row["ms_per_step"] > 0 and row["peak_mb"] is not None


def test_a_case_process_past_its_time_limit_gives_none(capsys):
    case = {"case": "capsnet", "mode": "train", "batch": 2, "iters": 3, "amp": "off"}
    args = parse_args(["--device", "cpu", "--case-timeout", "0.01"])
    assert run_fresh(case, args) is None
    assert "no result within" in capsys.readouterr().err


def test_default_plan_has_bf16_rows_the_sweep_and_every_network():
    cases = plan(parse_args([]))
    keys = [(c["case"], c["mode"], c["batch"], c["iters"], c["amp"]) for c in cases]
    assert len(set(keys)) == len(keys)
    for amp in ("off", "bf16"):
        assert {("conv-only", "train", 128, None, amp), ("capsnet", "train", 128, 3, amp),
                ("conv-only", "infer", 256, None, amp), ("capsnet", "infer", 256, 3, amp)} <= set(keys)
    assert {c["iters"] for c in cases if c["case"] == "capsnet" and c["batch"] == 128 and c["amp"] == "off"} \
        == {1, 2, 3, 4, 5}
    for m in ("capsnet+self_attention", "efficient_capsnet", "idpa_capsnet", "matrix_capsnet"):
        assert {c["mode"] for c in cases if c["case"] == m} == {"train", "infer"}
    # the default (fused C++ routing) beside the same network with routing in PyTorch operations
    assert {("capsnet+torch_routing", "train", 32, 3, "off"), ("capsnet+torch_routing", "train", 128, 3, "off"),
            ("capsnet+torch_routing", "infer", 256, 3, "off")} <= set(keys)


@pytest.mark.parametrize("argv", [["--device", "cpu", "--amp", "fp16"], ["--models", "resnet"], ["--amp", "fp8"],
                                  ["--models", "capsnet+torch_routing"],  # timed beside the CapsNet rows already
                                  ["--infer-batch", "0"], ["--batch-sizes", "32,0"], ["--iters", "0,3"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


DRIFT = [1.0, 0.5, 2.0]  # the machine's speed in each round: ratios within a round must cancel it


def fake_runner(order):
    """Rows as a child process would print them: images/s = base rate x the round's drift."""
    base = {"conv-only": 10.0, "capsnet": 9.0, "capsnet+torch_routing": 8.0, "naive": 6.0}

    def run(case, args):
        r = len(order) // n_cases[0]
        order.append(case["case"] + case["mode"])
        if case["case"] == "naive" and case["mode"] == "infer" and r == 1:
            return None  # this round's process failed
        ips = base[case["case"]] * DRIFT[r] * (0.5 if case["amp"] == "bf16" else 1.0)
        return {**case, "input": "noise", "ms_per_step": 1000 * case["batch"] / ips, "images_per_second": ips,
                "peak_mb": 100.0 + r}

    n_cases = [0]
    return run, n_cases


def test_rounds_rotate_fold_to_median_and_spread_with_per_round_ratios(tmp_path, capsys):
    argv = ["--device", "cpu", "--batch-sizes", "2", "--infer-batch", "2", "--iters", "3", "--models", "none",
            "--amp", "off,bf16", "--gemm-seconds", "0", "--json", str(tmp_path / "b.json")]
    order = []
    run, n_cases = fake_runner(order)
    n_cases[0] = len(plan(parse_args(argv)))
    result = main(argv, runner=run)
    n = n_cases[0]
    rounds = [order[i * n:(i + 1) * n] for i in range(3)]
    assert rounds[1] == rounds[0][1:] + rounds[0][:1] and rounds[2] == rounds[0][2:] + rounds[0][:2]
    rows = {(r["case"], r["mode"], r["amp"]): r for r in result["rows"]}
    caps = rows[("capsnet", "train", "off")]
    assert caps["images_per_second"] == pytest.approx(statistics.median(9.0 * d for d in DRIFT))
    assert (caps["images_per_second_min"], caps["images_per_second_max"]) == (4.5, 18.0)
    assert caps["vs_conv_bound"] == pytest.approx(0.9) and caps["vs_naive"] == pytest.approx(1.5)
    assert rows[("capsnet", "train", "bf16")]["vs_fp32"] == pytest.approx(0.5)
    assert rows[("capsnet", "train", "bf16")]["vs_conv_bound"] == pytest.approx(0.9)
    failed = rows[("naive", "infer", "off")]
    assert failed["failed"] == 1 and failed["per_round_images_per_second"][1] is None
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["rows"] == result["rows"]
    meta = saved["meta"]
    assert set(meta["flags"]) == set(FLAGS) and meta["threads"] >= 1 and meta["allocator"] == "keep"
    assert {"cpu", "torch", "gemm_gflops_fp32", "gemm_gflops_bf16", "load_before", "load_after"} <= set(meta)
    assert meta["routing_kernel"] == "cpp"  # built before the first case, so no case times the build
    assert len(meta["after_each_round"]) == 3 and meta["rounds"] == 3
    out = capsys.readouterr().out
    assert "| capsnet | bf16 | train | 2 | 3 |" in out and "(1 of 3 rounds failed)" in out
    # the goals table: each precision against its own bound, 0.9 < 0.95 is not met
    assert "| fp32 training step at batch 2 >= 95% of the fp32 conv-only bound | 90% | **no** |" in out
    assert "| bf16 inference at batch 2 >= 95% of the bf16 conv-only bound | 90% | **no** |" in out


def bench_json(path, rows, amp_in_rows=True, **meta):
    meta = {"date": "2026-01-02T03:04:05", "cpu": "Test CPU", "cpus": 2, "flags": {f: False for f in FLAGS},
            "threads": 2, "torch": "2.x", "allocator": "keep", "gpu": None, "rounds": 3, "warmup": 1,
            "steps": 3, "load_before": [0.1, 0.1, 0.1], "load_after": [0.2, 0.2, 0.2], "amp": "off", **meta}
    full = [{"case": c, "mode": m, "batch": b, "iters": i, "ms_per_step": 1000.0 * b / ips,
             "images_per_second": ips, "images_per_second_min": ips * 0.9, "images_per_second_max": ips * 1.1,
             "peak_mb": 123.0, "vs_conv_bound": None, "vs_naive": None, "vs_fp32": None, "rounds": 3, "failed": 0,
             **({"amp": "off"} if amp_in_rows else {})} for c, m, b, i, ips in rows]
    path.write_text(json.dumps({"meta": meta, "rows": full}))
    return path


def test_compare_lists_common_cases_with_b_over_a(tmp_path, capsys):
    a = bench_json(tmp_path / "a.json", [("capsnet", "train", 128, 3, 40.0), ("naive", "train", 128, 3, 30.0)],
                   amp_in_rows=False)  # the older format: amp only in meta
    b = bench_json(tmp_path / "b.json", [("capsnet", "train", 128, 3, 50.0), ("capsnet", "infer", 256, 3, 9.0)],
                   cpu="Other CPU")
    main(["--compare", str(a), str(b)])
    out = capsys.readouterr().out
    assert "| capsnet | off | train | 128 | 3 | 40.0 | 50.0 | 1.25 |" in out
    assert "naive" not in out and "infer" not in out and "2 case(s) in only one" in out
    assert "A: Test CPU" in out and "B: Other CPU" in out
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CapsnetError, match="bad.json"):
        main(["--compare", str(a), str(tmp_path / "bad.json")])


def test_markdown_prints_the_docs_block_and_docs_rewrites_only_between_markers(tmp_path, capsys):
    f = bench_json(tmp_path / "bench.json", [("conv-only", "train", 128, None, 40.0),
                                            ("capsnet", "train", 128, 3, 38.0)],
                   command="python -m capsnet.tools.bench", load_before=[3.0, 2.0, 1.0],
                   after_each_round=[{"load": 2.5, "gemm_gflops_fp32": 30.0}, {"load": 1.5, "gemm_gflops_fp32": 190.0}])
    main(["--markdown", str(f)])
    block = capsys.readouterr().out
    assert block.startswith("`python -m capsnet.tools.bench`, on 2026-01-02: Test CPU (2 CPUs)")
    assert "measured while other work ran on the machine" in block.lower()
    assert "load average 2.5, 1.5; fp32 GEMM probe 30, 190 GFLOP/s" in block
    assert "| capsnet | off | train | 128 | 3 | 3368 | 38.0 | 34.2-41.8 | 123 |" in block
    assert block.index("| conv-only |") < block.index("| capsnet |")
    doc = tmp_path / "perf.md"
    doc.write_text(f"# Title\n\nmarkers named inline: `{BEGIN}` `{END}`\n{BEGIN}\nold table\n{END}\nafter\n")
    main(["--markdown", str(f), "--docs", str(doc)])
    text = doc.read_text()
    assert text.startswith(f"# Title\n\nmarkers named inline: `{BEGIN}` `{END}`\n{BEGIN}\n")
    assert text.endswith(END + "\nafter\n")
    assert "old table" not in text and block.strip() in text
    doc.write_text("no markers\n")
    with pytest.raises(CapsnetError, match="bench:begin"):
        main(["--markdown", str(f), "--docs", str(doc)])


def test_a_busy_cpu_sample_decides_whether_the_machine_was_loaded(tmp_path, capsys):
    """The second before the run decides, not the lagging 1-minute load average; the sampler reads /proc/stat."""
    from capsnet.tools.bench_machine import cpu_busy

    rows = [("conv-only", "train", 128, None, 40.0), ("capsnet", "train", 128, 3, 38.0)]
    for busy, loaded in ((0.05, False), (0.6, True)):
        main(["--markdown", str(bench_json(tmp_path / "b.json", rows, load_before=[1.5, 1.0, 1.0],
                                           busy_before=busy))])
        block = capsys.readouterr().out
        assert ("other work ran" in block) == loaded, block
        assert f"{busy:.0%} of the CPUs busy in the second before the run" in block
    busy = cpu_busy(0.05)
    assert busy is None or 0.0 <= busy <= 1.0


def test_machine_record_parts():
    info = cpu_info()
    assert set(info["flags"]) == set(FLAGS) and info["cpus"] >= 1
    import torch

    assert gemm_gflops(torch.float32, torch.device("cpu"), 64, 0.0) > 0


def test_split_sets_each_operator_of_the_capsnet_step_beside_the_bound(capsys):
    """--split profiles both steps in one process: the convolutions appear on both sides, the capsule
    layers, decoder, losses and optimiser on the CapsNet's only, and the totals are the rows' sums."""
    from capsnet.tools.bench_split import format_split, op_times

    times = op_times(2, "off", train=True, rounds=1, steps=1)
    bound, caps = times["conv-only"], times["capsnet"]
    conv = [k for k in bound if k.startswith("aten::convolution_backward")]
    assert conv and all(caps[k] > 0 for k in conv)  # shared: the same convolutions, by shape
    assert caps["aten::_fused_adam_"] > 0 and bound["aten::_fused_adam_"] == 0  # the bound takes no step
    lines = format_split(times, "t", top=3).splitlines()
    total, own = next(ln for ln in lines if "**total**" in ln).split("|"), next(ln for ln in lines if "own" in ln)
    assert float(total[2]) == pytest.approx(sum(bound.values()), abs=0.06)
    assert float(total[3]) == pytest.approx(sum(caps.values()), abs=0.06)
    assert float(own.split("|")[3]) == pytest.approx(sum(v for k, v in caps.items() if not bound[k]), abs=0.06)
    assert float(own.split("|")[3]) >= caps["aten::_fused_adam_"] - 0.05
    tables = main(["--split", "--quick"])
    assert list(tables) == [k for k in tables if "batch 2, amp off" in k] and len(tables) == 2
    assert "**total**" in capsys.readouterr().out

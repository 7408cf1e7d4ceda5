"""The benchmark runner works on CPU (smoke tests: no timing assertions)."""

from __future__ import annotations

import json

import pytest

from benchmarks.harness import to_markdown
from benchmarks.run import main


def _run(tmp_path, *args):
    out = tmp_path / "res.json"
    result = main([*args, "--device", "cpu", "--json", str(out), "--steps", "1", "--warmup", "1", "--repeats", "2"])
    data = json.loads(out.read_text())  # valid JSON on disk
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    md = (tmp_path / "res.md").read_text()
    assert md.startswith(f"# Benchmark `{data['scenario']}`")
    env = data["environment"]
    for key in ("date_utc", "command", "torch", "peft", "transformers", "cpu", "device"):
        assert env[key], key
    assert env["command"].startswith("python -m benchmarks.run ")
    return data, md


def _check_rows(data, names):
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == names
    for r in rows.values():
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["throughput"] > 0 and r["n_steps"] == 2
    frozen = rows[names[0]]
    assert frozen["role"] == "frozen" and frozen["trainable_params"] == 0
    for r in list(rows.values())[1:]:
        assert r["x_frozen"] > 0 and r["trainable_params"] > 0
    return rows


def test_tiny_scenario_writes_json_and_markdown(tmp_path):
    data, md = _run(tmp_path, "tiny")
    rows = _check_rows(data, ["frozen", "peft-lora", "lava-lora", "lava"])
    assert rows["lava-lora"]["trainable_params"] == rows["peft-lora"]["trainable_params"]
    for r in rows.values():  # CPU memory via the profiler's allocation trace
        assert r["peak_mem_gib"] > 0 and r["step_peak_gib"] > 0
    assert "x_peft" in rows["lava"] and "mem_x_frozen" in rows["lava"]
    assert "| lava |" in md


def test_shira_rows_compare_with_pefts_shira(tmp_path):
    data, _ = _run(tmp_path, "tiny", "--shira", "--no-memory", "--variants", "frozen,peft-lora,peft-shira,lava-shira")
    rows = _check_rows(data, ["frozen", "peft-lora", "peft-shira", "lava-shira"])
    assert rows["lava-shira"]["trainable_params"] == rows["peft-shira"]["trainable_params"]
    peft_shira = rows["peft-shira"]["step_ms"]
    assert rows["lava-shira"]["x_peft"] == pytest.approx(peft_shira / rows["lava-shira"]["step_ms"], rel=1e-3)


def test_cnn_scenario_smoke(tmp_path):
    data, _ = _run(tmp_path, "cnn", "--blocks", "1,1,1,1", "--image-size", "32", "--batch", "2", "--no-memory",
                   "--variants", "frozen,peft-lora-conv,lava-conv,lava-conv-separable")
    rows = _check_rows(data, ["frozen", "peft-lora-conv", "lava-conv", "lava-conv-separable"])
    # same CP parameterisation whatever the execution path
    assert rows["lava-conv"]["trainable_params"] == rows["lava-conv-separable"]["trainable_params"]


def test_llm_scenario_smoke(tmp_path):
    data, _ = _run(tmp_path, "llm", "--layers", "1", "--hidden", "32", "--intermediate", "64", "--heads", "4",
                   "--kv-heads", "2", "--vocab", "64", "--batch", "1", "--seq", "8", "--rank", "2", "--no-memory")
    _check_rows(data, ["frozen", "peft-lora", "lava-lora", "lava"])
    assert "bf16" in data["setup"]


def test_markdown_marks_failed_rows():
    result = {"scenario": "x", "environment": {"date_utc": "d", "command": "c", "cpu": "cpu", "cpu_count": 2,
                                               "torch_threads": 2, "torch": "t", "peft": "p", "transformers": "tr",
                                               "lava_peft": "l", "git": None, "device": "cpu"},
              "setup": "s", "timing": "t", "memory_method": "m", "notes": ["GPU figures unmeasured"],
              "rows": [{"name": "broken", "role": "lava", "notes": "", "trainable_params": 0, "error": "boom"}]}
    md = to_markdown(result)
    assert "| broken | failed: boom |" in md and "GPU figures unmeasured" in md


def test_unknown_scenario_is_rejected():
    with pytest.raises(SystemExit):
        main(["nope", "--device", "cpu"])


@pytest.mark.parametrize("stage", ["reference", "composed"])
def test_ablation_stages_leave_the_fused_node_and_keep_the_function(stage):
    import torch
    from torch import nn

    import lava_peft as lp
    from benchmarks.ablation import apply_stage

    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(8, 6)), lp.LavaConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        model.model[0].adapters["default"].lava_V.normal_()
    x = torch.randn(3, 8)
    fused = model(x)
    assert type(fused.grad_fn).__name__ == "_LowRankLinearBackward"
    apply_stage(model, stage)
    out = model(x)
    assert type(out.grad_fn).__name__ != "_LowRankLinearBackward"
    torch.testing.assert_close(out, fused, rtol=1e-5, atol=1e-6)


def test_cpu_conv_scenario_smoke(tmp_path):
    """MobileNetV2 rows: PEFT adapts only the convs it accepts, our like-for-like row the same ones."""
    data, _ = _run(tmp_path, "cpu-conv", "--image-size", "32", "--batch", "2", "--no-memory",
                   "--variants", "frozen,peft-lora-conv,lava-lora-conv-peft-targets,lava-lora-conv,lava-conv")
    rows = _check_rows(data, ["frozen", "peft-lora-conv", "lava-lora-conv-peft-targets", "lava-lora-conv", "lava-conv"])
    assert rows["lava-lora-conv-peft-targets"]["trainable_params"] == rows["peft-lora-conv"]["trainable_params"]
    assert rows["lava-lora-conv"]["trainable_params"] > rows["peft-lora-conv"]["trainable_params"]  # depthwise too
    assert "rank is divisible by groups" in data["notes"][0] and "skips 17 depthwise convs" in data["notes"][0]


def test_gpu_sized_minilm_scenario_runs_bf16_with_fusion_and_dora_rows(tmp_path):
    """`minilm` (gpu_all.sh's MiniLM row) is cpu-minilm in bf16 weights; shrunk here to one layer."""
    data, _ = _run(tmp_path, "minilm", "--layers", "1", "--batch", "2", "--seq", "8", "--no-memory", "--fusion",
                   "--dora", "--variants", "frozen,peft-lora,lava-lora,lava-lora-unfused,peft-dora,lava-lora-dora")
    rows = _check_rows(data, ["frozen", "peft-lora", "lava-lora", "peft-dora", "lava-lora-dora", "lava-lora-unfused"])
    assert "bf16 weights" in data["setup"] and "batch 2x8" in data["setup"]
    assert rows["lava-lora"]["trainable_params"] == rows["peft-lora"]["trainable_params"] == 4 * 8 * (384 + 384) + \
        2 * 8 * (384 + 1536)  # 4 square 384 linears + intermediate and output (384<->1536), r=8
    assert rows["lava-lora-dora"]["trainable_params"] == rows["peft-dora"]["trainable_params"]


def test_conv_scenario_on_craft_vgg_leaves_the_dilated_conv_out_of_pefts_targets(tmp_path):
    """CRAFT VGG16-BN: PEFT's LoRA-conv ignores dilation, so its row (and our like-for-like row) skip that conv."""
    data, _ = _run(tmp_path, "conv", "--backbone", "craft_vgg16_bn", "--image-size", "32", "--batch", "1",
                   "--dtype", "fp32", "--no-memory", "--variants", "frozen,peft-lora-conv,lava-lora-conv-peft-targets")
    rows = _check_rows(data, ["frozen", "peft-lora-conv", "lava-lora-conv-peft-targets"])
    assert rows["lava-lora-conv-peft-targets"]["trainable_params"] == rows["peft-lora-conv"]["trainable_params"]
    assert data["setup"].startswith("CRAFT VGG16-BN") and "fp32" in data["setup"]
    assert "1 dilated conv(s) ['backbone.slice5.1']" in data["notes"][0]


def test_equal_budget_lava_conv_row_matches_pefts_parameter_count(tmp_path):
    """The equal-budget LAVA row adapts PEFT's convs at the CP rank whose count is closest to PEFT's."""
    import re

    import torch
    from torch import nn

    from lava_peft.models import load_craft_vgg16_bn

    data, _ = _run(tmp_path, "conv", "--backbone", "craft_vgg16_bn", "--image-size", "32", "--batch", "1",
                   "--dtype", "fp32", "--no-memory", "--variants", "frozen,peft-lora-conv,lava-conv-equal-budget")
    rows = _check_rows(data, ["frozen", "peft-lora-conv", "lava-conv-equal-budget"])
    r = int(re.search(r"CP-conv r=(\d+)", rows["lava-conv-equal-budget"]["notes"]).group(1))
    convs = [m for n, m in load_craft_vgg16_bn(num_classes=10).named_modules()
             if isinstance(m, nn.Conv2d) and tuple(m.dilation) == (1, 1)]
    assert len(convs) == 13

    def cp_count(rank):  # independent: a CP rank-1 term of an O×I×k1×k2 kernel, rank capped at prod/max
        total = 0
        for m in convs:
            dims = [m.out_channels, m.in_channels // m.groups, *m.kernel_size]
            cap = int(torch.tensor(dims).prod()) // max(dims)
            total += min(rank, cap) * sum(dims)
        return total

    peft = rows["peft-lora-conv"]["trainable_params"]
    assert peft == sum(8 * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels) for m in convs)
    assert rows["lava-conv-equal-budget"]["trainable_params"] == cp_count(r)
    assert abs(cp_count(r) - peft) <= min(abs(cp_count(r - 1) - peft), abs(cp_count(r + 1) - peft))
    assert r > 8  # a 3×3 CP term is several times cheaper than a LoRA-conv one


# --------------------------------------------------------------------------- gpu_all.sh / gpu_summary.py
GPU_ALL = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_all.sh")
GPU_SCENARIOS = ["llm", "cnn", "llm-quant", "minilm", "conv-mobilenet", "conv-craft", "mixed_serving", "switching",
                 "load_time", "fusion_micro"]


def _gpu_all_dry_run(tmp_path, **env):
    import os
    import subprocess
    import sys

    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", GPU_ALL, "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, "RESULTS_DIR": str(out), **env})
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()  # a dry run writes nothing
    commands = {}
    for line in proc.stdout.splitlines():
        if line.startswith("=== "):
            name, command = line[4:].split(": ", 1)
            commands[name] = command.split()
    return commands, out


def test_gpu_all_dry_run_lists_every_scenario_with_valid_arguments(tmp_path, monkeypatch):
    """Every scenario appears once, on CUDA, writing gpu-<name>.json into RESULTS_DIR; and each command's
    arguments parse: with CUDA hidden, each entry point stops at its no-CUDA check (argparse errors exit 2)."""
    import importlib
    import sys

    import torch

    commands, out = _gpu_all_dry_run(tmp_path)
    assert list(commands) == GPU_SCENARIOS + ["summary"]
    for name in GPU_SCENARIOS:
        argv = commands[name]
        assert argv[:2] == [sys.executable, "-m"]
        assert "--device" in argv and argv[argv.index("--device") + 1] == "cuda"
        assert argv[argv.index("--json") + 1] == str(out / f"gpu-{name}.json")
    assert commands["conv-craft"][3:6] == ["conv", "--backbone", "craft_vgg16_bn"]
    assert {"--fusion", "--dora"} <= set(commands["minilm"]) and {"--compile", "--shira"} <= set(commands["llm"])
    summary = commands["summary"]
    assert summary[summary.index("--expect") + 1] == ",".join(GPU_SCENARIOS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in GPU_SCENARIOS:
        module = importlib.import_module(commands[name][2])
        with pytest.raises(SystemExit) as info:
            module.main(commands[name][3:])
        assert "no CUDA device visible to torch" in str(info.value.code), name


def test_gpu_all_subset_and_unknown_names(tmp_path):
    import os
    import subprocess

    commands, _ = _gpu_all_dry_run(tmp_path, GPU_ALL_ONLY="switching,cnn")
    assert list(commands) == ["cnn", "switching", "summary"]
    assert commands["summary"][commands["summary"].index("--expect") + 1] == "cnn,switching"
    proc = subprocess.run(["bash", GPU_ALL, "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GPU_ALL_ONLY": "llm,resnet"})
    assert proc.returncode == 2 and "unknown scenario 'resnet'" in proc.stderr


def _training_file(scenario, rows):
    return {"scenario": scenario, "environment": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x", "peft": "0.x"},
            "setup": "s", "timing": "t", "memory_method": "m", "unit": "tokens", "rows": rows, "notes": []}


SUMMARY_FIXTURES = {  # shaped like benchmarks/results/{cpu-minilm,mixed_serving,switching-minilm,load_time}.json
    "gpu-minilm.json": _training_file("minilm", [
        {"name": "frozen", "role": "frozen", "group": "eager", "step_ms": 80.0, "x_peft": 1.25, "mem_x_peft": 0.9},
        {"name": "peft-lora", "role": "peft", "group": "eager", "step_ms": 100.0, "x_frozen": 0.8, "mem_x_frozen": 1.1},
        {"name": "lava-lora", "role": "lava", "group": "eager", "step_ms": 84.0, "x_frozen": 0.9524, "x_peft": 1.1905,
         "mem_x_peft": 0.97, "mem_x_frozen": 1.07},
        {"name": "lava-dora", "role": "lava", "group": "eager", "error": "RuntimeError: boom"},
        {"name": "lava+compile", "role": "lava", "group": "compiled", "step_ms": 60.0, "x_frozen": 1.05, "x_peft": 1.3}]),
    "gpu-mixed_serving.json": {"environment": {}, "workloads": [{"workload": "minilm"}], "notes": [], "rows": [
        {"workload": "minilm", "row": "single", "library": "ours", "x_single": 1.0, "x_peft": 1.2},
        {"workload": "minilm", "row": "single", "library": "peft", "x_single": 1.0, "x_peft": 1.0},
        {"workload": "minilm", "row": "8 adapters", "library": "ours", "x_single": 0.85, "x_peft": 1.6},
        {"workload": "minilm", "row": "8 adapters", "library": "peft", "x_single": 0.6, "x_peft": 1.0},
        {"workload": "minilm", "row": "8 adapters", "library": "ours-loop", "x_single": 0.5, "x_peft": 0.95}]},
    "gpu-switching.json": {"environment": {}, "models": [{"model": "minilm"}], "notes": [], "rows": [
        {"model": "minilm", "method": "lora", "rank": 16, "operation": op, "variant": who, "x_peft": x}
        for op, ours in (("set_adapter (unmerged)", 0.8), ("switch", 0.45), ("switch, exact_unmerge", 0.7),
                         ("load+merge", 0.3))
        for who, x in (("peft", 1.0), ("ours", ours))]},
    "gpu-load_time.json": {"environment": {}, "setup": "s", "max_abs_output_diff_ours_vs_peft": {"1": 0.0}, "rows": [
        {"adapters": 1, "library": "ours", "x_peft": 0.4}, {"adapters": 1, "library": "peft", "x_peft": 1.0},
        {"adapters": 100, "library": "ours", "x_peft": 0.12}]},
    "gpu-fusion_micro.json": {"environment": {}, "headline": "median_ms", "cases": [
        {"case": "MiniLM q/k/v", "fused": {"median_ms": 2.0, "cpu_median_ms": 9.0},
         "unfused": {"median_ms": 4.0, "cpu_median_ms": 10.0}}]},
}


def test_gpu_summary_picks_the_headline_ratios_of_each_result_shape(tmp_path):
    from benchmarks.gpu_summary import main as summary_main, summarize_dir

    for name, data in SUMMARY_FIXTURES.items():
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "cpu-minilm.json").write_text(json.dumps(_training_file("cpu-minilm", [])))  # not gpu-*: ignored
    lines, missing = summarize_dir(str(tmp_path), expect=["minilm", "llm", "switching"])
    assert missing == ["llm"]
    tp, tm = "throughput (higher is better)", "time (lower is better)"
    assert lines == [
        {"scenario": "fusion_micro", "row": "MiniLM q/k/v", "measure": tm, "x_unfused": 0.5},  # 2.0 / 4.0 wall
        {"scenario": "load_time", "row": "1 adapters (ours)", "measure": tm, "x_peft": 0.4},
        {"scenario": "load_time", "row": "100 adapters (ours)", "measure": tm, "x_peft": 0.12},
        {"scenario": "minilm", "row": "peft-lora", "measure": tp, "x_frozen": 0.8, "x_peft": None, "mem_x_peft": None},
        {"scenario": "minilm", "row": "lava-lora", "measure": tp, "x_frozen": 0.9524, "x_peft": 1.1905,
         "mem_x_peft": 0.97},
        {"scenario": "minilm", "row": "lava-dora", "measure": tp, "failed": "RuntimeError: boom"},
        {"scenario": "minilm", "row": "lava+compile [compiled]", "measure": tp, "x_frozen": 1.05, "x_peft": 1.3,
         "mem_x_peft": None},
        {"scenario": "mixed_serving minilm", "row": "8 adapters (ours)", "measure": tp, "x_single": 0.85, "x_peft": 1.6},
        {"scenario": "mixed_serving minilm", "row": "8 adapters (peft)", "measure": tp, "x_single": 0.6, "x_peft": None},
        {"scenario": "mixed_serving minilm", "row": "8 adapters (ours-loop)", "measure": tp, "x_single": 0.5,
         "x_peft": 0.95},
        {"scenario": "switching minilm", "row": "switch (lora r=16)", "measure": tm, "x_peft": 0.45},
        {"scenario": "switching minilm", "row": "load+merge (lora r=16)", "measure": tm, "x_peft": 0.3},
    ]
    assert summary_main(["--results", str(tmp_path), "--expect", "minilm,llm"]) == 0
    md = (tmp_path / "gpu-summary.md").read_text()
    assert "| minilm | lava-lora | throughput (higher is better) | 0.95 | 1.19 | 0.97 | — |" in md
    assert "| minilm | lava-dora | failed: RuntimeError: boom |" in md
    assert "| switching minilm | switch (lora r=16) | time (lower is better) | — | 0.45 | — | — |" in md
    assert "| fusion_micro | MiniLM q/k/v | time (lower is better) | — | — | — | 0.50 |" in md
    assert "- device: NVIDIA H100 80GB HBM3; torch 2.x, peft 0.x\n" in md  # from the first file that names one
    assert md.rstrip().endswith("Missing (failed or not run): llm")


def test_gpu_summary_rejects_a_file_of_unknown_shape(tmp_path):
    from benchmarks.gpu_summary import summarize_dir

    (tmp_path / "gpu-x.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="gpu-x|x: not a result file"):
        summarize_dir(str(tmp_path))

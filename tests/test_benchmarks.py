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

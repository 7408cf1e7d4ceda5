"""Smoke test of benchmarks/quality/methods.py: a tiny run writes well-formed methods.json / methods.md."""

import json

from benchmarks.quality.methods import VARIANTS, Settings, run_benchmark


def test_methods_benchmark_tiny(tmp_path):
    settings = Settings(variants=("dylora", "sft"), seeds=(0,), n_train=32, n_eval=32, max_len=16, threads=1)
    result = run_benchmark(settings, tmp_path, ["--out", str(tmp_path), "--tiny"])

    data = json.loads((tmp_path / "methods.json").read_text())
    assert data == json.loads(json.dumps(result))
    meta = data["meta"]
    for key in ("command", "date", "machine", "versions", "settings", "wall_s", "load_avg_start", "load_avg_end"):
        assert key in meta, key
    assert meta["settings"]["seeds"] == [0] and meta["settings"]["n_train"] == 32

    runs = data["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [("dylora", 0), ("sft", 0)]
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 100.0
        assert r["head_params"] == 770 and r["trainable_params"] == r["adapter_params"] + 770
        assert r["file_bytes"] > r["adapter_tensor_bytes"] > 0
        assert r["train_s"] >= 0 and r["eval_s"] >= 0
    dylora, sft = runs
    assert set(dylora["accuracy_at_rank"]) == {"8", "4"} and dylora["accuracy"] == dylora["accuracy_at_rank"]["8"]
    # LT-SFT trains as many entries as LoRA r=8 has parameters: 12 layers of 8·(384 + 384)
    assert sft["adapter_params"] == dylora["adapter_params"] == 12 * 8 * (384 + 384)
    assert sft["setup_s"] > 0  # phase 1 ran

    rows = data["rows"]
    assert [r["variant"] for r in rows] == ["dylora", "dylora", "sft"]
    assert rows[0]["label"].endswith("rank 8") and rows[1]["label"].endswith("rank 4")

    md = (tmp_path / "methods.md").read_text()
    assert md.startswith("# ")
    assert "`python -m benchmarks.quality.methods --out" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == table[0].count("|") for line in table)
    for r in rows:
        assert any(line.startswith(f"| {r['label']} |") for line in table)
    assert "seed noise" in md.splitlines()[-1]


def test_every_variant_is_a_cli_method():
    from lava_peft.cli import METHODS

    assert {v.method for v in VARIANTS.values()} <= set(METHODS)
    assert {v.method for v in VARIANTS.values()} >= {"lava", "lora", "shira", "sft", "dylora", "lowbit", "mosa", "head"}

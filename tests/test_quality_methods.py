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


def test_methods_select_lr_and_merge_tiny(tmp_path):
    """--select-lr + --only/--merge: lr chosen on a by-movie validation split, other rows kept as they were."""
    from benchmarks.quality.methods import main, validation_split

    base = Settings(variants=("lora", "shira"), seeds=(0,), n_train=32, n_eval=32, max_len=16, threads=1)
    before = run_benchmark(base, tmp_path, ["--out", str(tmp_path), "--tiny"])
    lora_before = json.loads(json.dumps(before["rows"][0]))

    main(["--out", str(tmp_path), "--only", "shira", "--select-lr", "shira", "--lr-grid", "2e-4,2e-2", "--merge",
          "--seeds", "0", "--n-train", "32", "--n-eval", "32", "--max-len", "16", "--threads", "1"])
    data = json.loads((tmp_path / "methods.json").read_text())

    fit, val, n_movies = validation_split(Settings(n_train=32, n_eval=32))
    assert sorted(fit + val) == list(range(32)) and val and fit and n_movies >= 1
    from lava_peft.data import load_rotten_tomatoes

    movies = load_rotten_tomatoes(n_train=32, n_test=32, seed=0)[0].movies
    assert not {movies[i] for i in fit} & {movies[i] for i in val}  # split by movie

    assert [r["variant"] for r in data["rows"]] == ["lora", "shira"]
    lora, shira = data["rows"]
    assert lora == lora_before and lora["source"] == 0 and not lora["lr_selected_on_validation"]
    assert shira["source"] == 1 and shira["lr_selected_on_validation"]
    assert len(data["sources"]) == 2 and "--merge" in data["sources"][1]["command"]
    assert data["meta"] == data["sources"][1]

    (sel,) = data["lr_selection"]
    assert sel["variant"] == "shira" and sel["grid"] == [2e-4, 2e-2] and len(sel["validation_accuracy"]) == 2
    assert sel["chosen_lr"] in sel["grid"] and shira["lr"] == sel["chosen_lr"]
    assert sel["n_fit"] == len(fit) and sel["n_validation"] == len(val)
    assert [(r["variant"], r["seed"], r["evaluated_on"]) for r in data["runs"]] == [("lora", 0, "held-out"),
                                                                                   ("shira", 0, "held-out")]

    md = (tmp_path / "methods.md").read_text()
    assert "lr selection" in md and "not selected on validation" in md and "--merge" in md
    table = [line for line in md.splitlines() if line.startswith("| SHiRA")]
    assert len(table) == 2  # the main row and the selection row

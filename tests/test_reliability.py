"""Reliability and hostile input (issue 11): crash-safe writes, verified reads, strict validation
of adapter files, regexes that cannot hang, no silent no-op adapters, adapter names.

Kill tests fork a writer (cheap: torch is already imported), SIGKILL it at a random moment,
and check what a reader gets; every loop is bounded.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import stat
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lava_peft as lp
from _files import drop_manifest
from lava_peft import io
from lava_peft.config import ADAPTER_NAME_MAX_LENGTH, check_adapter_name
from lava_peft.inject import name_matches
from lava_peft.train.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint

from _tiny_models import randomize_adapters, tiny_bert, tiny_gpt2


def _fork(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            fn(*args)
        finally:
            os._exit(0)
    return pid


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# =========================================================================== single files: fsync order


def test_atomic_writers_fsync_the_file_before_and_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace->{os.path.basename(dst)}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    io.atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert events == ["fsync-file", "replace->a.json", "fsync-dir"]
    events.clear()
    io.atomic_save_safetensors({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    assert events == ["fsync-file", "replace->w.safetensors", "fsync-dir"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.safetensors"]  # no temp files left


# =========================================================================== atomic_directory + reader


def _write_pair(target, tag: str, i: int) -> None:
    """One 'adapter': a config naming (tag, i) and a weights file whose bytes encode the same."""
    with io.atomic_directory(target) as staging:
        (staging / io.CONFIG_NAME).write_text(json.dumps({"tag": tag, "i": i}))
        (staging / io.WEIGHTS_NAME).write_bytes(f"{tag}:{i};".encode() * (200 + i % 7))


def _read_pair(target) -> tuple[str, int]:
    got = io.read_adapter_files(target)
    cfg = json.loads(got.files[io.CONFIG_NAME])
    weights = got.files[io.WEIGHTS_NAME]
    assert weights == f"{cfg['tag']}:{cfg['i']};".encode() * (200 + cfg["i"] % 7), "mixed set"
    return cfg["tag"], cfg["i"]


def _write_forever(target, tag: str, start: int) -> None:
    i = start
    while True:
        _write_pair(target, tag, i)
        i += 1


def test_atomic_directory_round_trip_manifest_and_plain_folders(tmp_path):
    target = tmp_path / "adapter"
    (target / "other").mkdir(parents=True)  # e.g. a second adapter's folder: left alone
    _write_pair(target, "x", 1)
    _write_pair(target, "x", 2)
    got = io.read_adapter_files(target)
    assert got.verified and got.generation == 2 and got.source == target
    manifest = json.loads((target / io.MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {io.CONFIG_NAME, io.WEIGHTS_NAME} and manifest["generation"] == 2
    assert (target / "other").is_dir()
    for _ in range(3):
        _write_pair(target, "x", 3)
    assert len([p for p in target.iterdir() if p.name.startswith(io.GENERATION_PREFIX)]) == io.KEEP_GENERATIONS
    # a plain folder (older lava-peft, HF PEFT) has no manifest and is read as it is
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / io.CONFIG_NAME).write_text("{}")
    got = io.read_adapter_files(plain)
    assert not got.verified and got.files == {io.CONFIG_NAME: b"{}"}
    # an exception inside the block changes nothing
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_directory(target) as staging:
            (staging / io.CONFIG_NAME).write_text("half")
            raise RuntimeError("boom")
    assert _read_pair(target) == ("x", 3) and io.read_adapter_files(target).generation == 5


def test_reader_refuses_files_changed_behind_the_manifest(tmp_path):
    target = tmp_path / "adapter"
    _write_pair(target, "x", 1)
    config = target / io.CONFIG_NAME
    config.unlink()  # another program rewrites one file (new inode: the generation copy is intact)
    config.write_text(json.dumps({"tag": "x", "i": 99}))
    # the newest generation not older than the manifest is complete: it is read instead
    assert _read_pair(target) == ("x", 1)
    for gen in target.glob(io.GENERATION_PREFIX + "*"):
        (gen / io.CONFIG_NAME).write_text("{}")  # now nothing matches the manifest
    with pytest.raises(lp.AdapterFileError, match=r"adapter_config.json does not match its sha256 in lava_manifest.json"):
        io.read_adapter_files(target)


def test_a_switch_interrupted_half_way_reads_the_new_complete_generation(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    _write_pair(target, "x", 1)
    real_install, calls = io._install, []

    def die_after_first(source, destination):
        calls.append(destination.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between two renames
        real_install(source, destination)

    monkeypatch.setattr(io, "_install", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        _write_pair(target, "x", 2)
    monkeypatch.setattr(io, "_install", real_install)
    # top level: new config + old weights + old manifest. The reader gets generation 2 whole.
    assert json.loads((target / io.CONFIG_NAME).read_text())["i"] == 2
    assert _read_pair(target) == ("x", 2)
    _write_pair(target, "x", 3)  # the next save repairs the top level
    assert io.read_adapter_files(target).source == target and _read_pair(target) == ("x", 3)


def test_kill_9_during_directory_writes_never_leaves_a_mixed_or_unreadable_set(tmp_path):
    target = tmp_path / "adapter"
    _write_pair(target, "k", 0)
    rng = random.Random(0)
    last, interrupted, kills = 0, 0, 0
    while kills < 40 and (kills < 12 or last < 5 or not interrupted):  # bounded; adapts to a slow machine
        pid = _fork(_write_forever, target, "k", last + 1)
        time.sleep(rng.uniform(0.02, 0.12))
        _kill(pid)
        kills += 1
        interrupted += any(p.name.startswith(io.STAGING_PREFIX) for p in target.iterdir())
        tag, i = _read_pair(target)  # consistent (asserted inside), never older than what was read before
        assert tag == "k" and i >= last
        last = i
    assert last >= 5 and interrupted >= 1, (kills, last, interrupted)


def test_two_concurrent_writers_and_a_reader_never_mix(tmp_path):
    target = tmp_path / "adapter"
    _write_pair(target, "A", 0)
    writers = [_fork(_write_forever, target, "A", 1), _fork(_write_forever, target, "B", 1)]
    seen, reads, deadline = set(), 0, time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            seen.add(_read_pair(target)[0])
            reads += 1
    finally:
        for pid in writers:
            _kill(pid)
    assert reads > 20 and seen == {"A", "B"}, (reads, seen)
    _read_pair(target)


# =========================================================================== checkpoints


def _tiny_training_state(seed: int = 0):
    torch.manual_seed(seed)
    model = lp.adapt(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), lp.LavaConfig(r=2, target_modules=["0"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def _checkpoint_forever(run_dir, start: int, training_state) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    model, optimizer, scheduler = training_state  # built before the fork
    step = start
    while True:
        with torch.no_grad():
            model.model[0].adapters["default"].lava_U.fill_(float(step))
        save_checkpoint(checkpoint_dir(run_dir, step), model, optimizer, scheduler, {"step": step}, 0, 1, True)
        step += 1


def test_resume_skips_an_incomplete_tmp_checkpoint_and_says_so(tmp_path):
    model, optimizer, scheduler = _tiny_training_state()
    save_checkpoint(checkpoint_dir(tmp_path, 5), model, optimizer, scheduler, {"step": 5}, 0, 1, True)
    broken = checkpoint_dir(tmp_path, 6).with_name("step-000006.tmp")
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{}")  # written before the kill; the rest is missing
    with pytest.warns(UserWarning, match=r"ignoring incomplete checkpoint folder\(s\) \['step-000006.tmp'\].*resuming from step-000005"):
        assert latest_checkpoint(tmp_path).name == "step-000005"
    manifest = json.loads((checkpoint_dir(tmp_path, 5) / "adapter" / io.MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {io.CONFIG_NAME, io.WEIGHTS_NAME}  # adapter/ written as one unit


def test_kill_9_during_checkpoint_saves_then_resume_works(tmp_path):
    rng = random.Random(1)
    training_state = _tiny_training_state()
    step, saw_tmp, kills = 1, 0, 0
    while kills < 20 and (kills < 6 or step < 4 or not saw_tmp):  # bounded; adapts to a slow machine
        pid = _fork(_checkpoint_forever, tmp_path, step, training_state)
        time.sleep(rng.uniform(0.15, 0.5))
        _kill(pid)
        kills += 1
        folder = tmp_path / "checkpoints"
        saw_tmp += folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            latest = latest_checkpoint(tmp_path)
        if latest is None:
            continue
        model, optimizer, scheduler = _tiny_training_state(seed=5)
        state = load_checkpoint(latest, model, optimizer, scheduler, rank=0)
        assert state["step"] == int(latest.name.split("-")[1])
        assert torch.equal(model.model[0].adapters["default"].lava_U, torch.full((6, 2), float(state["step"])))
        step = state["step"] + 1
    assert step >= 4 and saw_tmp >= 1, (kills, step, saw_tmp)


# =========================================================================== validation of what is read


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), lp.LavaConfig(r=2, target_modules=["0", "2"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    # The validation below is what protects a folder without a manifest (older lava-peft, files edited
    # or copied by hand): drop the manifest and its generation copies, keeping the two plain files.
    drop_manifest(tmp_path)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    return fresh, tmp_path


def test_save_pretrained_writes_a_manifest_and_a_tampered_file_is_refused(tmp_path):
    torch.manual_seed(0)
    model = lp.adapt(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), lp.LavaConfig(r=2, target_modules=["0", "2"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / io.MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {io.CONFIG_NAME, io.WEIGHTS_NAME}
    weights = tmp_path / io.WEIGHTS_NAME
    good = weights.read_bytes()
    weights.write_bytes(good.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1))  # in place: the hard-linked copy changes too
    fresh = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    snap = _snapshot(fresh)
    with pytest.raises(lp.AdapterFileError, match=r"adapter_model.safetensors does not match its sha256 in lava_manifest.json"):
        lp.AdaptedModel.from_pretrained(fresh, tmp_path)
    assert _unchanged(fresh, snap)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap) -> bool:
    state = model.state_dict()
    return set(state) == set(snap) and all(torch.equal(state[k], snap[k]) for k in snap)


U_KEY, V_KEY = "base_model.model.0.lora_B.weight", "base_model.model.2.lora_A.weight"  # LAVA U, V in PEFT's layout


def test_integer_nan_and_retyped_tensors_are_refused(saved):
    from safetensors.torch import load_file, save_file

    fresh, path = saved
    weights = path / io.WEIGHTS_NAME
    good = weights.read_bytes()
    snap = _snapshot(fresh)
    tensors = load_file(weights)
    # header retyped F32 -> I32 (same byte count: the file stays well-formed)
    weights.write_bytes(good.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1))
    with pytest.raises(lp.AdapterFileError, match=r"has an integer/bool dtype 'I32' where a floating point tensor is expected"):
        lp.AdaptedModel.from_pretrained(fresh, path)
    for bad in (torch.int64, torch.bool):
        save_file({**tensors, U_KEY: tensors[U_KEY].to(bad)}, weights)
        with pytest.raises(lp.AdapterFileError, match=re.escape(f"'{U_KEY}' has an integer/bool dtype")):
            lp.AdaptedModel.from_pretrained(fresh, path)
    for value in (math.nan, math.inf, -math.inf):
        poisoned = tensors[V_KEY].clone()
        poisoned[0, 1] = value
        save_file({**tensors, V_KEY: poisoned}, weights)
        with pytest.raises(lp.AdapterFileError, match=re.escape(f"'{V_KEY}' holds 1 of 12 values that are not finite (NaN/Inf)")):
            lp.AdaptedModel.from_pretrained(fresh, path)
        assert io.read_safetensors(weights, allow_nonfinite=True)[V_KEY][0, 1].item() != 0
    assert _unchanged(fresh, snap)
    # declared integer buffers pass the reader; check_tensors_match still compares dtype kinds
    save_file({"m.sparse_indices": torch.arange(3, dtype=torch.int32), "m.lora_A.codes": torch.zeros(2, dtype=torch.uint8)}, weights)
    assert set(io.read_safetensors(weights)) == {"m.sparse_indices", "m.lora_A.codes"}
    with pytest.raises(lp.AdapterFileError, match=r"'m.w' is torch.int64, not a floating point type like the model's torch.float32"):
        io.check_tensors_match({"m.w": torch.zeros(2)}, {"m.w": torch.zeros(2, dtype=torch.int64)}, "f")
    weights.write_bytes(good)
    assert lp.AdaptedModel.from_pretrained(fresh, path) is not None


def _edit_config(path, change):
    drop_manifest(path)
    cfg_path = path / io.CONFIG_NAME
    payload = json.loads(cfg_path.read_text())
    change(payload)
    cfg_path.write_text(json.dumps(payload))


@pytest.mark.parametrize("change, message", [
    (lambda p: p["config"].pop("alpha"), r"config field\(s\) \['alpha'\] missing; lava-peft writes every field of LavaConfig"),
    (lambda p: p["config"].update(use_rslora="yes"), r"config field 'use_rslora' must be true or false; got 'yes' \(str\)"),
    (lambda p: p["config"].update(r="8"), r"config field 'r' must be an integer; got '8'"),
    (lambda p: p["config"].update(orth_factors=3), r"'orth_factors' must be a string or null; got 3"),
    (lambda p: p["config"].update(alpha=math.nan), r"LavaConfig.alpha must be a finite number > 0"),
    (lambda p: p["config"].update(alpha=-2.0), r"LavaConfig.alpha must be a finite number > 0"),
    (lambda p: p["config"].update(alpha_pattern={"0": math.inf}), r"alpha_pattern\['0'\] must be a finite number > 0"),
    (lambda p: p.update(format_version="1"), r"format_version is the string '1'; it must be the integer 1"),
    (lambda p: p.pop("format_version"), r"format_version must be a positive integer .* got None"),
    (lambda p: p["base_model_fingerprint"]["modules"].update({"0": [6, 7]}), r"base_model_fingerprint.sha256 does not match"),
])
def test_config_fields_are_present_typed_and_sane(saved, change, message):
    fresh, path = saved
    snap = _snapshot(fresh)
    _edit_config(path, change)
    with pytest.raises(lp.AdapterFileError, match=message) as info:
        lp.AdaptedModel.from_pretrained(fresh, path)
    assert str(path / io.CONFIG_NAME) in str(info.value)  # names the file
    assert _unchanged(fresh, snap)


def test_documented_format_default_fills_a_field_older_files_lack(tmp_path):
    import shutil

    from _tiny_models import conv_net

    path = tmp_path / "v1"
    shutil.copytree(Path(__file__).parent / "fixtures" / "format_v1" / "lava_conv", path)  # a format-1 folder
    _edit_config(path, lambda p: p["config"].pop("conv_path"))  # added to LavaConfig after format 1 shipped
    model = lp.AdaptedModel.from_pretrained(conv_net(), path)
    assert model.peft_config["default"].conv_path == "auto"
    assert model.peft_config["default"].task_type is None  # format 2's PEFT-named fields: documented defaults


def test_alpha_is_checked_on_user_configs_too():
    for bad in (math.nan, math.inf, 0.0, -1.0, "16", True):
        with pytest.raises(lp.LavaConfigError, match="alpha must be a finite number > 0"):
            lp.LavaConfig(target_modules=["q"], alpha=bad)
    with pytest.raises(lp.LavaConfigError, match="use_rslora must be True or False"):
        lp.LoraConfig(target_modules=["q"], use_rslora="yes")


# =========================================================================== regex safety

_HOSTILE = ["(.+)+X", "(a*)*b", "(a|a)*c", r"(\w+\s?)+$", "(x+x+)+y", r"(.*)\1", ".*.*.*.*.*Z"]


@pytest.mark.parametrize("pattern", _HOSTILE)
def test_catastrophic_regexes_are_refused_up_front(pattern):
    t0 = time.perf_counter()
    with pytest.raises(lp.LavaConfigError, match="can make matching a module name take exponential time"):
        lp.LavaConfig(target_modules=pattern)
    with pytest.raises(lp.LavaConfigError, match=r"rank_pattern key="):
        lp.LavaConfig(target_modules=["q"], rank_pattern={pattern: 2})
    assert time.perf_counter() - t0 < 0.5


def test_hostile_rank_pattern_in_a_saved_file_is_refused_quickly(tmp_path):
    model = lp.adapt(tiny_bert(), lp.LoraConfig(r=2, target_modules=["query", "value"]))
    model.save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda p: p["config"].update(rank_pattern={"(.+)+X": 1}))
    t0 = time.perf_counter()
    with pytest.raises(lp.AdapterFileError, match=r"rank_pattern key='\(\.\+\)\+X' is refused"):
        lp.AdaptedModel.from_pretrained(tiny_bert(), tmp_path)
    assert time.perf_counter() - t0 < 2.0  # before: hung for ever on a BERT module name


def test_a_hostile_target_regex_set_after_construction_is_still_refused_by_adapt():
    config = lp.LoraConfig(r=2, target_modules="all-linear")
    config.target_modules = "(.+)+X"  # bypasses __post_init__
    with pytest.raises(lp.LavaConfigError, match="exponential time"):
        lp.adapt(tiny_bert(), config)
    with pytest.raises(lp.LavaConfigError, match="exclude_modules"):
        name_matches("(a|a)*", "x", nn.Linear(1, 1), "exclude_modules")


def test_ordinary_regexes_still_work():
    for ok in [r".*\.(query|value)", r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|key)",
               r"^bert\.encoder\.layer\.0\.attention\.self\.query$", "(?:a\\.b|c\\.d|e)", r"(.*\.)?dense"]:
        lp.LavaConfig(target_modules=ok, rank_pattern={ok: 2})
    model = lp.adapt(tiny_bert(), lp.LoraConfig(r=2, target_modules=r".*\.(query|value)"))
    assert len(list(model.adapter_layers("default"))) == 4


# =========================================================================== no silent no-ops


class _AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_out_proj_is_refused_or_skipped():
    with pytest.raises(lp.UnsupportedLayerError, match="nn.MultiheadAttention reads out_proj.weight directly"):
        lp.adapt(_AttentionNet(), lp.LoraConfig(r=2, target_modules=["out_proj"]))
    with pytest.raises(lp.UnsupportedLayerError, match="cannot adapt 'attn.out_proj'"):
        lp.adapt(_AttentionNet(), lp.LoraConfig(r=2, target_modules=r"attn\..*"))
    with pytest.warns(UserWarning, match="skipping 'attn.out_proj'"):
        model = lp.adapt(_AttentionNet(), lp.LoraConfig(r=2, target_modules="all-linear"))
    assert [p for p, _ in model.adapter_layers("default")] == ["inp", "out"]
    # a type entry matches the exact class: out_proj (NonDynamicallyQuantizableLinear) is not selected
    model = lp.adapt(_AttentionNet(), lp.LoraConfig(r=2, target_modules=[nn.Linear]))
    assert [p for p, _ in model.adapter_layers("default")] == ["inp", "out"]


def test_transformer_encoder_layer_fast_path_is_refused_unless_switched_off():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(lp.TargetModulesError, match="matched no adaptable"):
        warnings.simplefilter("always")
        lp.adapt(layer, lp.LoraConfig(r=2, target_modules="all-linear"))
    skipped = sorted(str(w.message).split("skipping ")[1].split(":")[0] for w in caught if "skipping" in str(w.message))
    assert skipped == ["'linear1'", "'linear2'", "'self_attn.out_proj'"]
    with pytest.raises(lp.UnsupportedLayerError, match=r"set_fastpath_enabled\(False\)"):
        lp.adapt(layer, lp.LoraConfig(r=2, target_modules=["linear1"]))


def _each_adapter_changes_the_output(adapted, inputs) -> dict[str, float]:
    """Perturb one adapter at a time (all others zero); how far the unmerged output (eval, no grad) moves."""
    adapted.eval()
    with torch.no_grad():
        for _, layer in adapted.adapter_layers("default"):
            for p in layer.parameters():
                p.zero_()
        reference = _out(adapted(**inputs))
        moved = {}
        for path, layer in adapted.adapter_layers("default"):
            saved = [p.clone() for p in layer.parameters()]
            gen = torch.Generator().manual_seed(0)
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            moved[path] = float((_out(adapted(**inputs)) - reference).abs().max())
            for p, s in zip(layer.parameters(), saved):
                p.copy_(s)
    return moved


def _out(output):
    return output.logits if hasattr(output, "logits") else output


class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _layer_cases():
    from transformers.pytorch_utils import Conv1D

    return [
        ("Linear", nn.Linear(5, 4), torch.randn(2, 5)),
        ("Conv1d", nn.Conv1d(3, 4, 3), torch.randn(2, 3, 7)),
        ("Conv2d", nn.Conv2d(3, 4, 3, groups=1), torch.randn(2, 3, 6, 6)),
        ("Conv2d-grouped", nn.Conv2d(4, 4, 3, groups=2), torch.randn(2, 4, 6, 6)),
        ("Conv3d", nn.Conv3d(2, 3, 2), torch.randn(1, 2, 4, 4, 4)),
        ("Embedding", nn.Embedding(10, 4), torch.tensor([[1, 2, 3]])),
        ("GPT-2 Conv1D", Conv1D(4, 5), torch.randn(2, 5)),
    ]


@pytest.mark.parametrize("method", ["lava", "lora"])
def test_every_layer_type_adapt_accepts_changes_the_unmerged_output(method):
    cls = lp.LavaConfig if method == "lava" else lp.LoraConfig
    for label, layer, x in _layer_cases():
        torch.manual_seed(0)
        model = lp.adapt(_Holder(layer), cls(r=2, target_modules=["layer"]))
        moved = _each_adapter_changes_the_output(model, {"x": x})
        assert moved["layer"] > 1e-4, (label, moved)


def test_every_adapter_in_real_containers_changes_the_unmerged_output():
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torch.manual_seed(0)
        encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        with pytest.warns(UserWarning, match="skipping 'self_attn.out_proj'"):
            model = lp.adapt(encoder, lp.LoraConfig(r=2, target_modules="all-linear"))
        moved = _each_adapter_changes_the_output(model, {"src": torch.randn(2, 5, 16)})
        assert sorted(moved) == ["linear1", "linear2"] and min(moved.values()) > 1e-4, moved
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    ids = {"input_ids": torch.tensor([[3, 5, 7, 9, 11]])}
    for build in (tiny_bert, tiny_gpt2):
        model = lp.adapt(build(), lp.LavaConfig(r=2, target_modules="all-linear"))
        moved = _each_adapter_changes_the_output(model, ids)
        assert len(moved) >= 8 and min(moved.values()) > 1e-6, (build.__name__, moved)


# =========================================================================== adapter names


def test_adapter_names_fullmatch_and_length():
    assert check_adapter_name("a" * ADAPTER_NAME_MAX_LENGTH) == "a" * 64
    assert check_adapter_name("task-1_b") == "task-1_b"
    for bad in ("a\n", "a" * 65, "", "a.b", "../x", "a b", 3, None, "é"):
        with pytest.raises(lp.AdapterNameError, match="use 1 to 64 letters, digits"):
            check_adapter_name(bad)
    with pytest.raises(lp.AdapterNameError, match=r"and not '__base__'"):
        check_adapter_name("__base__", reserved=("__base__",))

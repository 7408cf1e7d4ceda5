"""DDP with 2 CPU processes (gloo), no change to the training code.

* Our ``Trainer`` launched by ``torchrun`` and by ``accelerate launch``: the same script
  trains (a) as 2 processes with batch 2 × grad-accum 2 per rank and (b) in this process
  with batch 8, i.e. the same global batch of 8.  The adapters must be identical on both
  ranks, equal the single-process result, and rank 0 alone writes the adapter files.
* A user's own loop with ``accelerate.Accelerator`` (``prepare`` / ``backward``) on an
  ``AdaptedModel``: 2 processes equal one process with the global batch.
* FSDP2 (``fully_shard``) over an ``AdaptedModel``: 2 processes equal one process, and
  ``save_pretrained`` on every rank gathers the shards and writes once (rank 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import lava_peft as lp
from lava_peft.adapter_files import read_adapter_dir

WORKER = textwrap.dedent(
    '''
    import os, sys
    import torch
    import lava_peft as lp
    from lava_peft.train import Trainer, TrainingArguments


    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                  torch.nn.ReLU(), torch.nn.Linear(16, 2))
        model = lp.adapt(net, lp.LavaConfig(r=4, target_modules=["0", "2"], modules_to_save=["4"], orth_lambda=0.5))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(40, 10, generator=g)
        y = (x[:, :3].sum(1) > 0).long()
        return model, {"x": x[:32], "labels": y[:32]}, {"x": x[32:], "labels": y[32:]}


    def train(out, batch_size, accum):
        model, train_data, eval_data = build()
        args = TrainingArguments(output_dir=out, max_steps=6, batch_size=batch_size, grad_accum_steps=accum,
                                 lr=0.05, warmup_steps=1, eval_every=3, save_every=3, progress=False, summary=False)
        trainer = Trainer(model, args, train_data, eval_data)
        trainer.train()
        return trainer


    if __name__ == "__main__":
        out = sys.argv[1]
        trainer = train(out, batch_size=2, accum=2)
        rank = trainer.rank
        state = {k: v.contiguous() for k, v in trainer.unwrapped.adapter_state_dict().items()}
        from safetensors.torch import save_file
        save_file(state, os.path.join(out, f"final_rank{rank}.safetensors"))
        with open(os.path.join(out, f"eval_rank{rank}.txt"), "w") as fh:
            fh.write(repr((trainer.world, trainer.last_eval["accuracy"], trainer.last_eval["loss"])))
    '''
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, script, *args) -> subprocess.CompletedProcess:
    """Run ``script`` as 2 CPU processes with ``torchrun`` or ``accelerate launch``."""
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:  # accelerate's multi-process launcher; on a machine without GPUs the processes use gloo on the CPU
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([*cmd, str(script), *map(str, args)], capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ddp_two_processes_match_single_process(tmp_path, launcher):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    proc = _launch(launcher, script, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = load_file(str(out / "final_rank0.safetensors"))
    r1 = load_file(str(out / "final_rank1.safetensors"))
    assert set(r0) == set(r1) and len(r0) > 0
    for k in r0:  # DDP keeps the replicas bit-identical
        assert torch.equal(r0[k], r1[k]), k
    # both ranks report the same (all-reduced) eval over the whole eval set
    assert (out / "eval_rank0.txt").read_text() == (out / "eval_rank1.txt").read_text()
    world, _, _ = eval((out / "eval_rank0.txt").read_text())
    assert world == 2
    # rank 0 wrote the files, once: adapter, checkpoints with per-rank RNG, metrics
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    ckpt = out / "checkpoints" / "step-000006"
    assert (ckpt / "rng_state_rank0.safetensors").is_file() and (ckpt / "rng_state_rank1.safetensors").is_file()
    saved = read_adapter_dir(out / "adapter").read_tensors()  # our key layout, whatever the file's
    for k in r0:
        assert torch.equal(saved[k], r0[k]), k

    # single process, batch 8 (= 2 ranks x 2 micro-batches x 2): the same global batches
    namespace: dict = {"__name__": "worker"}
    exec(compile(WORKER, "worker", "exec"), namespace)
    single = namespace["train"](str(tmp_path / "single"), batch_size=8, accum=1)
    ref = single.unwrapped.adapter_state_dict()
    moved = 0.0
    init = namespace["build"]()[0].adapter_state_dict()
    for k in r0:
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
        moved = max(moved, float((ref[k] - init[k]).abs().max()))
    assert moved > 1e-2  # training really changed the adapter
    assert single.last_eval["accuracy"] == eval((out / "eval_rank0.txt").read_text())[1]


SMALL_TASK = textwrap.dedent(
    '''
    import os, sys
    import torch
    import lava_peft as lp


    def small_task():
        """A 2-layer net with LAVA on both linears, 32 samples of a linear rule."""
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        model = lp.adapt(net, lp.LavaConfig(r=4, target_modules=["0", "2"], rank_pattern={"2": 2}, orth_lambda=0.5))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 10, generator=g)
        return model, x, (x[:, :3].sum(1) > 0).long()
    '''
)

ACCELERATE_WORKER = SMALL_TASK + textwrap.dedent(
    '''
    from accelerate import Accelerator


    def build():
        model, x, y = small_task()
        return model, torch.utils.data.TensorDataset(x, y)


    def train(batch_size):
        model, data = build()
        accelerator = Accelerator(cpu=True)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        for x, y in loader:
            reg = accelerator.unwrap_model(model).regularization_loss()
            accelerator.backward(torch.nn.functional.cross_entropy(model(x), y) + reg)
            opt.step()
            opt.zero_grad()
        return accelerator, accelerator.unwrap_model(model)


    if __name__ == "__main__":
        acc, model = train(batch_size=4)
        from safetensors.torch import save_file
        state = {k: v.contiguous() for k, v in model.adapter_state_dict().items()}
        kind = str(acc.distributed_type).rsplit(".", 1)[-1]
        save_file(state, os.path.join(sys.argv[1], f"rank{acc.process_index}_of{acc.num_processes}_{kind}.safetensors"))
    '''
)


def test_accelerate_prepare_loop_two_processes_match_single_process(tmp_path):
    script = tmp_path / "acc_worker.py"
    script.write_text(ACCELERATE_WORKER)
    proc = _launch("accelerate", script, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "rank0_of2_MULTI_CPU.safetensors"))  # really 2 processes, DDP on the CPU
    r1 = load_file(str(tmp_path / "rank1_of2_MULTI_CPU.safetensors"))
    namespace: dict = {"__name__": "acc_worker"}
    exec(compile(ACCELERATE_WORKER, "acc_worker", "exec"), namespace)
    from accelerate.state import AcceleratorState

    try:
        _, single = namespace["train"](batch_size=8)  # one process, the same global batches of 8
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate singleton to later tests
    ref = single.adapter_state_dict()
    init = namespace["build"]()[0].adapter_state_dict()
    assert set(r0) == set(ref) and len(ref) == 4
    for k in ref:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-2


FSDP_WORKER = SMALL_TASK + textwrap.dedent(
    '''
    import torch.distributed as dist

    build = small_task


    def train(model, x, y, rank=0, world=1):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        per_rank = 8 // world
        for step in range(4):  # global batches of 8, split between the ranks
            rows = slice(step * 8 + rank * per_rank, step * 8 + (rank + 1) * per_rank)
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows]) + model.regularization_loss()
            loss.backward()
            opt.step()
            opt.zero_grad()


    if __name__ == "__main__":
        dist.init_process_group("gloo")
        from torch.distributed.fsdp import fully_shard
        model, x, y = build()
        fully_shard(model)
        train(model, x, y, dist.get_rank(), dist.get_world_size())
        model.save_pretrained(sys.argv[1])  # every rank: gathers the shards; rank 0 writes
        dist.barrier()
        dist.destroy_process_group()
        # exit without the interpreter's teardown: gloo's threads under FSDP2 sometimes abort
        # there ("terminate called without an active exception") after all work is done
        sys.stdout.flush()
        os._exit(0)
    '''
)


def test_fsdp2_fully_shard_two_processes_match_single_process(tmp_path):
    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    out = tmp_path / "adapter"
    proc = _launch("torchrun", script, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = read_adapter_dir(out).read_tensors()  # our key layout, whatever the file's
    namespace: dict = {"__name__": "fsdp_worker"}
    exec(compile(FSDP_WORKER, "fsdp_worker", "exec"), namespace)
    model, x, y = namespace["build"]()
    init = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    namespace["train"](model, x, y)
    ref = model.adapter_state_dict()
    assert set(saved) == set(ref) and len(ref) == 4
    for k in ref:
        assert saved[k].shape == ref[k].shape, k  # full tensors, not one rank's shard
        torch.testing.assert_close(saved[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-2
    reloaded = lp.AdaptedModel.from_pretrained(namespace["build"]()[0].unload(), str(out))
    torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-6)


MOSA_WORKER = textwrap.dedent(
    '''
    import os, sys
    import torch
    import lava_peft as lp
    from lava_peft.tools.mosa import mosa_loss_fn
    from lava_peft.train import Trainer, TrainingArguments


    def train(out, batch_size):
        """MoSA: two forwards (different modules) per step for the consistency loss, then one backward."""
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        model = lp.adapt(net, lp.MosaConfig(adapter="factors", r=2, n_modules=2, target_modules=["0", "2"], factorization="lava"))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 10, generator=g)
        data = {"x": x, "labels": (x[:, :3].sum(1) > 0).long()}
        args = TrainingArguments(output_dir=out, max_steps=4, batch_size=batch_size, lr=0.05, progress=False,
                                 summary=False, save_every=0)
        trainer = Trainer(model, args, data, loss_fn=mosa_loss_fn(1.0))
        trainer.train()
        return trainer


    if __name__ == "__main__":
        trainer = train(sys.argv[1], batch_size=4)
        from safetensors.torch import save_file
        state = {k: v.contiguous() for k, v in trainer.unwrapped.adapter_state_dict().items()}
        save_file(state, os.path.join(sys.argv[1], f"mosa_rank{trainer.rank}.safetensors"))
    '''
)


def test_mosa_consistency_loss_under_ddp_matches_single_process(tmp_path):
    """Two forwards before one backward under DDP: gradients of both are reduced, replicas stay equal."""
    script = tmp_path / "mosa_worker.py"
    script.write_text(MOSA_WORKER)
    out = tmp_path / "ddp"
    proc = _launch("torchrun", script, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = load_file(str(out / "mosa_rank0.safetensors")), load_file(str(out / "mosa_rank1.safetensors"))
    namespace: dict = {"__name__": "mosa_worker"}
    exec(compile(MOSA_WORKER, "mosa_worker", "exec"), namespace)
    ref = namespace["train"](str(tmp_path / "single"), batch_size=8).unwrapped.adapter_state_dict()
    assert set(r0) == set(ref) and len(ref) == 4
    for k in ref:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)

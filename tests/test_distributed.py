"""DDP under ``torchrun``: 2 CPU processes (gloo), no change to the training code.

The same script trains (a) as 2 processes with batch 2 × grad-accum 2 per rank and (b) in
this process with batch 8, i.e. the same global batch of 8.  The adapters must be
identical on both ranks, equal the single-process result, and rank 0 alone writes the
adapter files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

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


def test_ddp_two_processes_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script), str(out)],
        capture_output=True, text=True, timeout=180, env=env,
    )
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
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
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

"""The Trans-LoRA pipeline: resumable stages writing into one run folder.

::

    <out>/run.json                      the settings of the run (informational)
    <out>/source/                       stage 1, while the real data is available:
        seeds.jsonl                       the 5 seed examples kept for later
        adapter/                          the source adapter (teacher)
    <out>/discriminator/                stage 2: negatives.jsonl (source-generated), adapter/
    <out>/synthetic/                    stage 3: candidates/accepted/rejected .jsonl
    <out>/distill-<inputs>/adapter/     stage 4: the transferred adapter on the target
    <out>/upper-bound/adapter/          optional: the target trained on the real data
    <out>/target-zero-shot/             the target base model's accuracy
    <out>/summary.json                  every figure of the run

Each stage folder gets ``stage.json`` (its settings, result and wall time) when it
finishes; a later run skips a finished stage and re-reads its outputs, and refuses one
whose recorded settings differ from the current ones (start a new folder instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lava_peft as lp

from ..io import atomic_write_json, read_json
from .discriminator import judge, train_discriminator
from .distill import KD_MODES, choose_kd_mode, distill
from .errors import TransferError
from .synthetic import read_jsonl, rejection_sample, sample_inputs, write_jsonl
from .task import SENTIMENT, CompletionTask, Example, accuracy, answer_loss, check_tokenizer
from .training import METHODS, adapter_config, train_adapter

__all__ = ["TransferConfig", "TaskData", "TransferRun", "DISTILL_INPUTS", "check_config"]

DISTILL_INPUTS = ("filtered", "unfiltered", "seeds", "random-text")


@dataclass
class TransferConfig:
    """Settings of one transfer (CLI flags map one to one; see ``lava transfer --help``).

    The defaults are sized for the zoo LMs on a 2-core CPU (minutes per stage); the paper
    distills on |D| = 250 inputs for 10-20 epochs with a 7B model on a GPU.
    """

    source: str = "llama-tiny"
    target: str = "llama-small"
    source_method: str = "lora"
    target_method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    n_train: int = 4000
    n_test: int = 500
    n_seeds: int = 5
    n_synthetic: int = 100
    n_disc: int = 150
    source_epochs: int = 2
    source_lr: float = 1e-3
    disc_epochs: int = 15
    disc_lr: float = 1e-3
    distill_epochs: int = 30
    distill_lr: float = 3e-3
    batch_size: int = 16
    kd: str = "auto"
    kd_all_tokens: bool = False
    kd_temperature: float = 1.0
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 40
    max_candidates: int = 0  # 0: 50 * n_synthetic
    distill_inputs: str = "filtered"
    seed: int = 0


_SOURCE_FIELDS = ("source", "source_method", "r", "alpha", "n_train", "n_seeds", "source_epochs", "source_lr",
                  "batch_size", "seed")
_GEN_FIELDS = ("temperature", "top_p", "max_new_tokens")
STAGE_FIELDS = {
    "source": _SOURCE_FIELDS,
    "discriminator": _SOURCE_FIELDS + _GEN_FIELDS + ("n_disc", "disc_epochs", "disc_lr"),
    "synthetic": _SOURCE_FIELDS + _GEN_FIELDS + ("n_disc", "disc_epochs", "disc_lr", "target", "n_synthetic",
                                                 "max_candidates"),
    "distill": _SOURCE_FIELDS + _GEN_FIELDS + ("n_disc", "disc_epochs", "disc_lr", "target", "n_synthetic",
                                               "max_candidates", "target_method", "kd", "kd_all_tokens",
                                               "kd_temperature", "distill_epochs", "distill_lr", "n_test"),
    "upper-bound": ("target", "target_method", "r", "alpha", "n_train", "source_epochs", "source_lr", "batch_size",
                    "seed", "n_test"),
    "target-zero-shot": ("target", "n_test"),
}


def check_config(cfg: TransferConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded or trained."""
    if cfg.n_seeds < 1:
        raise TransferError(f"n_seeds={cfg.n_seeds}: the generator needs seed examples; keep at least 1 (the paper keeps 5)")
    if cfg.n_synthetic < 1:
        raise TransferError(f"n_synthetic={cfg.n_synthetic}: ask for at least 1 accepted synthetic input")
    for name in ("n_train", "n_test", "n_disc", "source_epochs", "disc_epochs", "distill_epochs", "batch_size",
                 "max_new_tokens", "r"):
        if getattr(cfg, name) < 1:
            raise TransferError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.n_seeds > cfg.n_train:
        raise TransferError(f"n_seeds={cfg.n_seeds} cannot exceed n_train={cfg.n_train}")
    if cfg.kd not in KD_MODES:
        raise TransferError(f"kd={cfg.kd!r}; choose one of {list(KD_MODES)}")
    if cfg.distill_inputs not in DISTILL_INPUTS:
        raise TransferError(f"distill_inputs={cfg.distill_inputs!r}; choose one of {list(DISTILL_INPUTS)}")
    for name in ("source_method", "target_method"):
        if getattr(cfg, name) not in METHODS:
            raise TransferError(f"{name}={getattr(cfg, name)!r}; choose one of {list(METHODS)}")
    if not 0 < cfg.top_p <= 1 or cfg.temperature <= 0:
        raise TransferError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {cfg.temperature}, {cfg.top_p})")
    if cfg.max_candidates and cfg.max_candidates < cfg.n_synthetic:
        raise TransferError(f"max_candidates={cfg.max_candidates} < n_synthetic={cfg.n_synthetic}; raise it (0 = 50 n)")


@dataclass
class TaskData:
    """Real task data (``train`` for the owner side, ``test`` for evaluation) and unrelated
    text (``other_texts``, the random-text ablation)."""

    train: list[Example]
    test: list[Example]
    other_texts: list[str]


def default_task_data(cfg: TransferConfig) -> TaskData:
    """Rotten Tomatoes (by-movie split) + lines of the other packaged corpora."""
    from ..zoo.corpus import packaged_documents
    from .task import load_sentiment_data

    train, test = load_sentiment_data(cfg.n_train, cfg.n_test, cfg.seed)
    lines = [ln.strip() for doc in packaged_documents(("hamlet", "speeches", "debates", "headlines"))
             for ln in doc.split("\n") if len(ln.strip()) >= 20]
    return TaskData(train, test, [" ".join(ln.split()[:40]) for ln in lines])


def load_lm(spec: str):
    """``(model, tokenizer)`` for a zoo name (pretrained on first use) or a local HF model folder."""
    from ..zoo.recipes import RECIPES

    if spec in RECIPES:
        from ..zoo.pretrain import load_zoo_model

        return load_zoo_model(spec, train_if_missing=True)
    if not Path(spec).is_dir():
        raise TransferError(f"{spec!r} is neither a zoo model ({sorted(RECIPES)}) nor a local model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(spec, local_files_only=True).eval(), AutoTokenizer.from_pretrained(
        spec, local_files_only=True)


class TransferRun:
    """One run folder; each ``stage_*`` method runs its stage or re-reads it when finished.

    ``source`` / ``target`` are ``(model, tokenizer)`` pairs or a callable returning one
    (loaded on first use, so a run whose stages are all finished loads nothing it does
    not need).  ``data`` defaults to :func:`default_task_data`.
    """

    def __init__(self, cfg: TransferConfig, out: str | Path, source, target, data: TaskData | Callable | None = None,
                 task: CompletionTask = SENTIMENT, progress: bool = True, log: Callable[[str], None] = print):
        check_config(cfg)
        self.cfg, self.out, self.task, self.progress, self.log = cfg, Path(out), task, progress, log
        self._source_spec, self._target_spec = source, target
        self._data_spec = data if data is not None else (lambda: default_task_data(cfg))
        self._source = self._target = self._data = None
        self._source_wrap: lp.AdaptedModel | None = None
        self._target_wrap: lp.AdaptedModel | None = None
        self.results: dict[str, dict] = {}

    # ------------------------------------------------------------------ lazy inputs
    @staticmethod
    def _resolve(spec):
        return spec() if callable(spec) else spec

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = self._resolve(self._data_spec)
        return self._data

    @property
    def source(self):
        if self._source is None:
            self._source = self._resolve(self._source_spec)
            check_tokenizer(self._source[1], "source")
        return self._source

    @property
    def target(self):
        if self._target is None:
            self._target = self._resolve(self._target_spec)
            check_tokenizer(self._target[1], "target")
        return self._target

    def check_models(self) -> str:
        """Check both tokenizers and the KD mode before any training; returns the KD mode."""
        return choose_kd_mode(self.cfg.kd, self.source[1], self.target[1], self.source[0], self.target[0])

    def _wrapped(self, side: str) -> lp.AdaptedModel:
        if side == "source":
            if self._source_wrap is None:
                self._source_wrap = lp.AdaptedModel(self.source[0])
            return self._source_wrap
        if self._target_wrap is None:
            self._target_wrap = lp.AdaptedModel(self.target[0])
        return self._target_wrap

    def _adapter(self, side: str, name: str, folder: Path) -> lp.AdaptedModel:
        """The ``side`` wrapper with adapter ``name`` (loaded from ``folder`` if needed) active."""
        wrap = self._wrapped(side)
        if name not in wrap.peft_config:
            wrap.load_adapter(str(folder), name)
        wrap.set_adapter(name)
        return wrap.eval()

    @contextlib.contextmanager
    def _base(self, side: str):
        """The plain base model of ``side`` (adapters, if any, disabled inside the block)."""
        wrap = self._source_wrap if side == "source" else self._target_wrap
        model = self.source[0] if side == "source" else self.target[0]
        with wrap.disable_adapter() if wrap is not None else contextlib.nullcontext():
            yield model

    # ------------------------------------------------------------------ stage runner
    def _stage(self, name: str, kind: str, work: Callable[[Path], dict]) -> dict:
        folder = self.out / name
        marker = folder / "stage.json"
        settings = {f: getattr(self.cfg, f) for f in STAGE_FIELDS[kind]}
        if marker.exists():
            record = read_json(marker)
            if record.get("settings") != settings:
                changed = sorted(k for k in settings if record.get("settings", {}).get(k) != settings[k])
                raise TransferError(f"{folder} was finished with other settings ({changed}); use a new output folder")
            self.log(f"[{name}] finished earlier, reusing {folder}")
            self.results[name] = record["result"]
            return record["result"]
        self.log(f"[{name}] running")
        t0 = time.time()
        lp.set_seed(self.cfg.seed)  # adapter init and data order depend on the seed only
        folder.mkdir(parents=True, exist_ok=True)
        result = work(folder)
        result["seconds"] = round(time.time() - t0, 1)
        atomic_write_json(marker, {"settings": settings, "result": result})
        self.results[name] = result
        return result

    # ------------------------------------------------------------------ stages
    def stage_source(self) -> dict:
        """Seeds + source adapter trained on the real data (the owner side)."""
        cfg = self.cfg

        def work(folder: Path) -> dict:
            seeds = random.Random(cfg.seed).sample(self.data.train, cfg.n_seeds)
            write_jsonl(folder / "seeds.jsonl", [e._asdict() for e in seeds])
            model, tok = self.source
            wrap = self._wrapped("source")
            wrap.add_adapter("task", adapter_config(cfg.source_method, cfg.r, cfg.alpha, model))
            wrap.set_adapter("task")
            losses = self._supervised(wrap, tok, self.data.train, "source adapter")
            wrap.save_pretrained(str(folder / "adapter"), adapter_name="task")
            return {"accuracy": accuracy(wrap, tok, self.task, self.data.test), "final_loss": losses[-1]}

        return self._stage("source", "source", work)

    def _supervised(self, wrap, tok, examples, desc) -> list[float]:
        cfg = self.cfg
        device = next(wrap.parameters()).device

        def loss_fn(batch):
            return answer_loss(wrap, tok, [self.task.prompt(e.text) for e in batch],
                               [self.task.choices[e.label] for e in batch], device)

        return train_adapter(wrap, examples, loss_fn, epochs=cfg.source_epochs, lr=cfg.source_lr,
                             batch_size=cfg.batch_size, seed=cfg.seed, desc=desc, progress=self.progress)

    def seeds(self) -> list[Example]:
        return [Example(r["text"], r["label"]) for r in read_jsonl(self.out / "source" / "seeds.jsonl")]

    def stage_discriminator(self) -> dict:
        """Discriminator adapter on the source: real inputs vs source-generated ones."""
        cfg = self.cfg

        def work(folder: Path) -> dict:
            rng = random.Random(cfg.seed + 1)
            real = [e.text for e in rng.sample(self.data.train, min(cfg.n_disc, len(self.data.train)))]
            with self._base("source") as base:
                fake = sample_inputs(base, self.source[1], [e.text for e in self.data.train], cfg.n_disc,
                                     temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed + 2)
            fake = [t for t in fake if t]
            write_jsonl(folder / "negatives.jsonl", [{"text": t} for t in fake])
            wrap = self._wrapped("source")
            wrap.add_adapter("discriminator", adapter_config(cfg.source_method, cfg.r, cfg.alpha, self.source[0]))
            wrap.set_adapter("discriminator")
            report = train_discriminator(wrap, self.source[1], self.task.name, real, fake, epochs=cfg.disc_epochs,
                                         lr=cfg.disc_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                                         progress=self.progress)
            wrap.save_pretrained(str(folder / "adapter"), adapter_name="discriminator")
            return report

        return self._stage("discriminator", "discriminator", work)

    def stage_synthetic(self) -> dict:
        """Target-generated candidates, filtered by the discriminator (rejection sampling)."""
        cfg = self.cfg

        def work(folder: Path) -> dict:
            seeds = [e.text for e in self.seeds()]
            disc = self._adapter("source", "discriminator", self.out / "discriminator" / "adapter")
            tok = self.target[1]

            def propose(k: int, rnd: int) -> list[str]:
                with self._base("target") as base:
                    return sample_inputs(base, tok, seeds, k, temperature=cfg.temperature, top_p=cfg.top_p,
                                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 100_003 + rnd)

            result = rejection_sample(propose, lambda texts: judge(disc, self.source[1], self.task.name, texts),
                                      cfg.n_synthetic, max_candidates=cfg.max_candidates or None,
                                      progress=self.progress)
            write_jsonl(folder / "candidates.jsonl", result.candidates)
            write_jsonl(folder / "accepted.jsonl", result.accepted)
            write_jsonl(folder / "rejected.jsonl", result.rejected)
            stats = result.stats(cfg.n_synthetic)
            self.log(f"[synthetic] accepted {stats['accepted']} of {stats['candidates']} candidates "
                     f"(acceptance rate {stats['acceptance_rate']:.1%})")
            if not stats["complete"]:
                self.log(f"[synthetic] WARNING: only {stats['accepted']} accepted before max_candidates; "
                         "raise --max-candidates or the sampling temperature")
            return stats

        return self._stage("synthetic", "synthetic", work)

    def distill_texts(self, inputs: str) -> list[str]:
        """The inputs of one distillation variant (see ``DISTILL_INPUTS``)."""
        cfg = self.cfg
        if inputs == "seeds":
            return [e.text for e in self.seeds()]
        if inputs == "random-text":
            return random.Random(cfg.seed + 3).sample(self.data.other_texts, cfg.n_synthetic)
        records = read_jsonl(self.out / "synthetic" / ("accepted.jsonl" if inputs == "filtered" else "candidates.jsonl"))
        texts = [r["text"] for r in records if r["text"]][: cfg.n_synthetic]
        if not texts and inputs == "unfiltered":
            raise TransferError(f"the synthetic stage in {self.out / 'synthetic'} produced no non-empty candidates "
                                "(see candidates.jsonl); raise --max-new-tokens or --temperature")
        if not texts:
            self.log(f"[distill-{inputs}] WARNING: the discriminator accepted none of the target's candidates, so "
                     "there is nothing to distill on: the transferred adapter stays at its initialisation (ΔW = 0, "
                     "the target's zero-shot behaviour). Raise --max-candidates or --temperature, or retrain the "
                     "discriminator with more --n-disc texts")
        return texts

    def stage_distill(self, inputs: str | None = None) -> dict:
        """Distill teacher (source + task adapter) into a new adapter on the target."""
        cfg = self.cfg
        inputs = inputs or cfg.distill_inputs
        if inputs not in DISTILL_INPUTS:
            raise TransferError(f"inputs={inputs!r}; choose one of {list(DISTILL_INPUTS)}")
        name = f"distill-{inputs}"

        def work(folder: Path) -> dict:
            mode = self.check_models()
            texts = self.distill_texts(inputs)
            teacher = self._adapter("source", "task", self.out / "source" / "adapter")
            wrap = self._wrapped("target")
            wrap.add_adapter(name, adapter_config(cfg.target_method, cfg.r, cfg.alpha, self.target[0]))
            wrap.set_adapter(name)
            if texts:
                report = distill(teacher, self.source[1], wrap, self.target[1], self.task, texts, mode=mode,
                                 all_tokens=cfg.kd_all_tokens, temperature=cfg.kd_temperature,
                                 epochs=cfg.distill_epochs, lr=cfg.distill_lr, batch_size=cfg.batch_size,
                                 seed=cfg.seed, progress=self.progress)
            else:  # no accepted input: the adapter keeps its zero-delta initialisation (said in the log)
                report = {"mode": mode, "n_inputs": 0, "untrained": True}
            wrap.save_pretrained(str(folder / "adapter"), adapter_name=name)
            report["accuracy"] = accuracy(wrap, self.target[1], self.task, self.data.test)
            report["inputs"] = inputs
            return report

        return self._stage(name, "distill", work)

    def stage_upper_bound(self) -> dict:
        """The target trained on the real data with the source's recipe (not a transfer: a ceiling)."""
        def work(folder: Path) -> dict:
            wrap = self._wrapped("target")
            wrap.add_adapter("upper-bound", adapter_config(self.cfg.target_method, self.cfg.r, self.cfg.alpha,
                                                            self.target[0]))
            wrap.set_adapter("upper-bound")
            losses = self._supervised(wrap, self.target[1], self.data.train, "upper bound (target on real data)")
            wrap.save_pretrained(str(folder / "adapter"), adapter_name="upper-bound")
            return {"accuracy": accuracy(wrap, self.target[1], self.task, self.data.test), "final_loss": losses[-1]}

        return self._stage("upper-bound", "upper-bound", work)

    def stage_target_zero_shot(self) -> dict:
        def work(folder: Path) -> dict:
            with self._base("target") as base:
                return {"accuracy": accuracy(base, self.target[1], self.task, self.data.test)}

        return self._stage("target-zero-shot", "target-zero-shot", work)

    # ------------------------------------------------------------------ whole run
    def run(self, upper_bound: bool = False) -> dict:
        """All stages in order (finished ones are re-read); writes and returns ``summary.json``."""
        mode = self.check_models()  # tokenizers and KD mode are checked before anything is written
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "run.json", dataclasses.asdict(self.cfg))
        t0 = time.time()
        source = self.stage_source()
        disc = self.stage_discriminator()
        if self.cfg.distill_inputs in ("filtered", "unfiltered"):
            self.stage_synthetic()
        transferred = self.stage_distill()
        zero = self.stage_target_zero_shot()
        summary = {
            "source": self.cfg.source, "target": self.cfg.target, "kd_mode": mode,
            "distill_inputs": self.cfg.distill_inputs, "source_method": self.cfg.source_method,
            "target_method": self.cfg.target_method,
            "accuracy": {"source_with_adapter": source["accuracy"], "target_zero_shot": zero["accuracy"],
                         "target_with_transferred_adapter": transferred["accuracy"]},
            "discriminator_held_out_accuracy": disc["held_out_accuracy"],
            "synthetic": self.results.get("synthetic"),
            "transferred_adapter_untrained": bool(transferred.get("untrained", False)),
            "stage_seconds": {k: v.get("seconds") for k, v in self.results.items()},
            "seconds_this_invocation": round(time.time() - t0, 1),
        }
        if upper_bound:
            summary["accuracy"]["upper_bound_target_on_real_data"] = self.stage_upper_bound()["accuracy"]
            summary["stage_seconds"] = {k: v.get("seconds") for k, v in self.results.items()}
        atomic_write_json(self.out / "summary.json", summary)
        return summary

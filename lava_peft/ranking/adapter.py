"""``RankingAdapter``: a side branch over frozen image/text towers that scores and ranks images.

    image tokens ─proj─┐
                       ├─ fusion (image queries text) ─ z' ─┬─ score head ─→ s_i
    [prompts; text] ───┘                                    └─ pair head ──→ p_ij (i, j in the batch)

Not a weight delta: nothing merges into the towers.  See ``docs/ranking.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn

from ..errors import LavaConfigError, LavaError
from .heads import MeanDifferencePairHead, PromptTokens, RankingPairAttention, TextConditionedFusion, mlp_head, pair_index

__all__ = ["PAIR_HEADS", "RankingAdapter", "RankingConfig", "RankingInputError", "RankingOutput"]

PAIR_HEADS = ("attention", "mean-diff")


class RankingInputError(LavaError, ValueError):
    """A batch the ranking adapter cannot use (too few images, empty instruction, wrong shapes)."""


@dataclass
class RankingConfig:
    """Settings of :class:`RankingAdapter` (stored as JSON beside the weights).

    Args:
        width: common token width ``d`` of fusion and heads.
        project: trainable ``Linear`` projections from each tower's width to ``width``; with
            False both towers must already be ``width`` wide (e.g. CLIP's ``projection_dim``).
        prompts / prompt_mode: learnable prompt tokens prepended to the text (0 = none);
            ``"scalar"`` (one value per token, as the reference code) or ``"vector"``.
        heads / cross_layers / self_layers / ffn / dropout: the fusion transformer
            (``ffn`` None = ``width``).
        ranking_branch: add the pairwise branch and its loss.
        pair_head: ``"attention"`` (ranking-aware attention) or ``"mean-diff"`` (ablation).
        queries / pair_chunk / pairs_per_image: ranking queries; pairs per chunk; ``k``
            sampled partners per image instead of all ``B²`` ordered pairs.
        score_weight / pair_weight / nonzero_weight: loss weights (nonzero: optional BCE on y ≠ 0).
        image_width / text_width / towers: filled from the towers, checked on load.
    """

    width: int = 128
    project: bool = True
    prompts: int = 8
    prompt_mode: str = "vector"
    heads: int = 8
    cross_layers: int = 2
    self_layers: int = 2
    ffn: int | None = None
    dropout: float = 0.1
    ranking_branch: bool = True
    pair_head: str = "attention"
    queries: int = 16
    pair_chunk: int = 1024
    pairs_per_image: int | None = None
    score_weight: float = 0.2
    pair_weight: float = 1.0
    nonzero_weight: float = 0.0
    image_width: int | None = None
    text_width: int | None = None
    towers: str | None = None

    def __post_init__(self) -> None:
        def bad(msg: str):
            raise LavaConfigError(f"RankingConfig: {msg}")

        for name in ("width", "heads", "queries", "pair_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be a positive integer; got {value!r}")
        if self.width % self.heads:
            bad(f"width {self.width} must be divisible by heads {self.heads}")
        if self.prompts < 0 or self.cross_layers < 0 or self.self_layers < 0:
            bad("prompts, cross_layers and self_layers must be >= 0")
        if self.prompt_mode not in ("scalar", "vector"):
            bad(f"prompt_mode must be 'scalar' or 'vector'; got {self.prompt_mode!r}")
        if self.pair_head not in PAIR_HEADS:
            bad(f"pair_head must be one of {PAIR_HEADS}; got {self.pair_head!r}")
        if self.pairs_per_image is not None and self.pairs_per_image < 1:
            bad(f"pairs_per_image must be >= 1 or None; got {self.pairs_per_image}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1); got {self.dropout}")
        if min(self.score_weight, self.pair_weight, self.nonzero_weight) < 0:
            bad("loss weights must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RankingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LavaConfigError(f"RankingConfig has no field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)


class RankingOutput(NamedTuple):
    scores: torch.Tensor  # [B]
    pair_logits: torch.Tensor | None  # [n_pairs]
    pair_i: torch.Tensor | None
    pair_j: torch.Tensor | None
    nonzero_logits: torch.Tensor | None  # [B]


def _freeze_plain(tower: nn.Module) -> None:
    """Freeze a tower whose parameters are all trainable (a plain pretrained net); leave a tower
    that already mixes frozen and trainable ones (``lp.adapt`` froze its base) as it is."""
    flags = {p.requires_grad for p in tower.parameters()}
    if flags != {False, True}:
        tower.requires_grad_(False)


class RankingAdapter(nn.Module):
    """Scores (and pairwise orders) images given a text instruction, over frozen towers.

    Args:
        image_tower / text_tower: see :mod:`lava_peft.ranking.towers` (``width`` attribute,
            image ``forward(pixel_values)``, text ``forward(input_ids, attention_mask)``);
            either may be ``None`` when only cached tokens are fed.
        config: :class:`RankingConfig`; keyword arguments override its fields.
        image_width / text_width: needed only when a tower is ``None``.
    """

    def __init__(self, image_tower: nn.Module | None, text_tower: nn.Module | None,
                 config: RankingConfig | None = None, *, image_width: int | None = None,
                 text_width: int | None = None, **overrides):
        super().__init__()
        config = config or RankingConfig()
        if overrides:
            config = RankingConfig.from_dict({**config.to_dict(), **overrides})
        iw = image_tower.width if image_tower is not None else image_width
        tw = text_tower.width if text_tower is not None else text_width
        if iw is None or tw is None:
            raise LavaConfigError("RankingAdapter: give image_width/text_width when a tower is None")
        for name, saved, found in (("image", config.image_width, iw), ("text", config.text_width, tw)):
            if saved is not None and saved != found:
                raise LavaConfigError(f"RankingAdapter: the config was made for a {name} tower {saved} wide, "
                                      f"this one is {found} wide; use the towers it was trained with")
        if not config.project and (iw != config.width or tw != config.width):
            raise LavaConfigError(
                f"RankingAdapter: tower widths (image {iw}, text {tw}) differ from width={config.width} and "
                "project=False; set project=True (trainable projections) or width to the towers' common width")
        names = f"{getattr(image_tower, 'name', 'image')}+{getattr(text_tower, 'name', 'text')}"
        self.config = dataclasses.replace(config, image_width=iw, text_width=tw, towers=config.towers or names)
        c, d = self.config, self.config.width
        self.image_tower, self.text_tower = image_tower, text_tower
        for tower in (image_tower, text_tower):
            if tower is not None:
                _freeze_plain(tower)
                tower.eval()
        self.image_proj = nn.Linear(iw, d) if c.project else nn.Identity()
        self.text_proj = nn.Linear(tw, d) if c.project else nn.Identity()
        self.prompt = PromptTokens(c.prompts, d, c.prompt_mode) if c.prompts else None
        self.fusion = TextConditionedFusion(d, c.heads, c.cross_layers, c.self_layers, c.ffn, c.dropout)
        self.score_norm = nn.LayerNorm(d)
        self.score_head = mlp_head(d, 2)
        self.pair_head: nn.Module | None = None
        if c.ranking_branch:
            self.pair_head = (RankingPairAttention(d, c.heads, c.queries, 3, c.pair_chunk) if c.pair_head == "attention"
                              else MeanDifferencePairHead(d, 3, c.pair_chunk))
        self.nonzero_head = nn.Linear(d, 1) if c.nonzero_weight > 0 else None

    # ------------------------------------------------------------------ towers
    def train(self, mode: bool = True):
        super().train(mode)
        for tower in (self.image_tower, self.text_tower):
            if tower is not None:
                tower.eval()  # frozen: BatchNorm statistics and dropout stay as pretrained
        return self

    @staticmethod
    def _tower_trains(tower: nn.Module | None) -> bool:
        return tower is not None and any(p.requires_grad for p in tower.parameters())

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Instruction strings to text-tower inputs; an empty instruction is refused."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        empty = [k for k, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if not texts or empty:
            raise RankingInputError(f"empty instruction (at positions {empty[:5]}); every image needs a text such as "
                                    "'how many items are in the picture'")
        if self.text_tower is None or not hasattr(self.text_tower, "tokenize"):
            raise LavaConfigError("this adapter has no text tower with a tokenizer; pass input_ids or text_tokens")
        return self.text_tower.tokenize(texts)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image-tower tokens ``[B, P, image_width]`` (no gradient through a frozen tower)."""
        if self.image_tower is None:
            raise LavaConfigError("this adapter has no image tower; pass image_tokens")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._tower_trains(self.image_tower)):
            return self.image_tower(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_tower is None:
            raise LavaConfigError("this adapter has no text tower; pass text_tokens and text_mask")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._tower_trains(self.text_tower)):
            return self.text_tower(input_ids, attention_mask)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, batch: int, image_tokens, text_tokens, text_mask, attention_mask, with_pairs: bool) -> None:
        if with_pairs and batch < 2:
            raise RankingInputError(f"the ranking branch compares images in a batch and got {batch} image; use "
                                    "batches of at least 2 images (or with_pairs=False for scores only)")
        for name, tokens, tower in (("image", image_tokens, self.image_tower), ("text", text_tokens, self.text_tower)):
            if tokens is not None and self._tower_trains(tower):
                raise RankingInputError(f"cached {name}_tokens skip the {name} tower, whose adapter is trainable; "
                                        f"pass the raw inputs instead")
        mask = text_mask if text_tokens is not None else attention_mask
        if mask is not None:
            if mask.shape[0] != batch:
                raise RankingInputError(f"{batch} images but {mask.shape[0]} instructions; give one text per image")
            if not bool(mask.bool().any(1).all()):
                raise RankingInputError("empty instruction: some texts have no tokens; give every image a text")

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, image_tokens: torch.Tensor | None = None,
                text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                with_pairs: bool | None = None, pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> RankingOutput:
        """Scores (and pair logits) for a batch.

        Images: ``pixel_values`` or cached tower tokens ``image_tokens``; texts: ``input_ids`` +
        ``attention_mask`` or cached ``text_tokens`` + ``text_mask``.  Pairs: all ``B²`` ordered
        pairs, ``pairs_per_image`` sampled partners, or the ``pairs`` given.
        """
        if (pixel_values is None) == (image_tokens is None):
            raise RankingInputError("give exactly one of pixel_values or image_tokens")
        if (input_ids is None) == (text_tokens is None):
            raise RankingInputError("give exactly one of input_ids (+attention_mask) or text_tokens (+text_mask)")
        if input_ids is not None and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = (pixel_values if pixel_values is not None else image_tokens).shape[0]
        with_pairs = self.pair_head is not None if with_pairs is None else with_pairs
        if with_pairs and self.pair_head is None:
            raise LavaConfigError("this adapter was built with ranking_branch=False; it has no pair head")
        self._check_inputs(batch, image_tokens, text_tokens, text_mask, attention_mask, with_pairs)
        if image_tokens is None:
            image_tokens = self.encode_images(pixel_values)
        if text_tokens is None:
            text_tokens, text_mask = self.encode_text(input_ids, attention_mask)
        elif text_mask is None:
            text_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
        dtype = next(self.fusion.parameters()).dtype
        img = self.image_proj(image_tokens.to(dtype))
        txt, mask = self.text_proj(text_tokens.to(dtype)), text_mask.bool()
        if self.prompt is not None:
            txt, mask = self.prompt(txt, mask)
        z = self.fusion(img, txt, mask)
        pooled = self.score_norm(z).sum(1)
        scores = self.score_head(pooled).squeeze(-1)
        nonzero = self.nonzero_head(pooled).squeeze(-1) if self.nonzero_head is not None else None
        if not with_pairs:
            return RankingOutput(scores, None, None, None, nonzero)
        if pairs is None:
            pairs = pair_index(batch, self.config.pairs_per_image, generator, z.device)
        i, j = pairs
        return RankingOutput(scores, self.pair_head(z, i, j), i, j, nonzero)

    @torch.no_grad()
    def score(self, pixel_values: torch.Tensor, instruction: str | Sequence[str]) -> torch.Tensor:
        """Scores ``[B]`` of images for one instruction (or one per image), in eval mode."""
        texts = [instruction] * len(pixel_values) if isinstance(instruction, str) else list(instruction)
        enc = self.tokenize(texts)
        was = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            return self(pixel_values.to(device), enc["input_ids"].to(device), enc["attention_mask"].to(device),
                        with_pairs=False).scores
        finally:
            self.train(was)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name (the heads, plus a tower's own adapter if it has one)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

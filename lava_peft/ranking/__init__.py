"""Ranking-aware adapter for text-driven image ordering (spec: methods §5; docs/ranking.md).

    from lava_peft.ranking import RankingAdapter, build_task, mobilenet_minilm_towers, train_ranking
    model = RankingAdapter(*mobilenet_minilm_towers())          # a MobileNet–MiniLM pair, not CLIP
    task = build_task("rank-count", n_train=1000, n_eval=400)   # Fashion-MNIST canvases, 1-9 items
    train_ranking(model, task, "runs/rank-count", epochs=10)

A side branch over frozen image/text towers, not a weight delta: learnable prompt tokens,
text-conditioned fusion, a regression head and a pairwise ranking-aware attention head.
"""

from .adapter import PAIR_HEADS, RankingAdapter, RankingConfig, RankingInputError, RankingOutput
from .files import load_ranking_adapter, save_ranking_adapter
from .heads import MeanDifferencePairHead, PromptTokens, RankingPairAttention, TextConditionedFusion, pair_index
from .loss import pair_labels, ranking_loss
from .metrics import pairwise_accuracy, plcc, ranking_metrics, srcc
from .probe import linear_probe
from .tasks import ATTRIBUTES, TASKS, RankingTask, build_task
from .towers import (CLIPImageTower, CLIPTextTower, CNNImageTower, HFTextTower, clip_towers, minilm_tower,
                     mobilenet_minilm_towers, mobilenet_v2_tower)
from .train import prepare_split, train_ranking

__all__ = [
    "ATTRIBUTES", "CLIPImageTower", "CLIPTextTower", "CNNImageTower", "HFTextTower", "MeanDifferencePairHead",
    "PAIR_HEADS", "PromptTokens", "RankingAdapter", "RankingConfig", "RankingInputError", "RankingOutput",
    "RankingPairAttention", "RankingTask", "TASKS", "TextConditionedFusion", "build_task", "clip_towers",
    "linear_probe", "load_ranking_adapter", "minilm_tower", "mobilenet_minilm_towers", "mobilenet_v2_tower",
    "pair_index", "pair_labels", "pairwise_accuracy", "plcc", "prepare_split", "ranking_loss", "ranking_metrics",
    "save_ranking_adapter", "srcc", "train_ranking",
]

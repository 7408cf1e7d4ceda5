"""The zoo: small causal LMs pretrained here on text shipped in packages (no download).

    from lava_peft.zoo import load_zoo_model
    model, tokenizer = load_zoo_model("llama-tiny", train_if_missing=True)

See :mod:`.recipes` for the models, :mod:`.pretrain` for training and the cache.
"""

from .corpus import CORPUS_SOURCES, CorpusNotInstalledError, packaged_documents, split_documents
from .pretrain import ZooModelMissingError, cached_info, load_zoo_model, pretrain, zoo_dir
from .recipes import BIG_RECIPES, RECIPES, SMALL_RECIPES, Recipe, get_recipe
from .tokenizers import train_tokenizer

__all__ = [
    "BIG_RECIPES", "CORPUS_SOURCES", "CorpusNotInstalledError", "RECIPES", "Recipe", "SMALL_RECIPES",
    "ZooModelMissingError", "cached_info", "get_recipe", "load_zoo_model", "packaged_documents", "pretrain",
    "split_documents", "train_tokenizer", "zoo_dir",
]

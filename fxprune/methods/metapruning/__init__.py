"""MetaPruning (Liu et al., ICCV 2019): a PruningNet generates weights for any width vector; an
evolutionary search picks the best vector under FLOPs, params and latency limits."""
from .evolution import EvolutionConfig, evolve
from .method import (
                     LatencyUnreachableError,
                     MetaPruningMethod,
                     MetaPruningOptions,
                     metapruning,
                     pretrain,
                     split_data,
                     train_pruningnet,
)

__all__ = ["EvolutionConfig", "LatencyUnreachableError", "MetaPruningMethod", "MetaPruningOptions", "evolve",
           "metapruning", "pretrain", "split_data", "train_pruningnet"]

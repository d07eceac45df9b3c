"""Tensor-tile pruning: patterns, the reweighted group lasso, pruning plans and the recipe."""
from .patterns import PATTERNS, Pattern, group_norms, groups, make_mask, mask_sparsity
from .plan import DEFAULT_TILE, MatrixPlan, PruningPlan, make_plan
from .recipe import (METHODS, MaskKeeper, RecipeConfig, apply_plan, prune_module, prune_stages, run_recipe,
                     sparsity_report)
from .regularizers import ReweightedGroupLasso

__all__ = ["PATTERNS", "Pattern", "group_norms", "groups", "make_mask", "mask_sparsity", "DEFAULT_TILE", "MatrixPlan",
           "PruningPlan", "make_plan", "METHODS", "MaskKeeper", "apply_plan", "RecipeConfig", "prune_module",
           "prune_stages", "run_recipe", "sparsity_report", "ReweightedGroupLasso"]

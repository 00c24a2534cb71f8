"""Merge methods; importing this package registers them all.

gta            task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties,
               della, della_linear (mergekit's generalized task arithmetic presets)
interpolation  linear, slerp, nuslerp, model_stock; perturb_gaussian (a fragility probe)
sparse_aware   ram, ramplus_tl, disjoint_mean, fisher, sar
"""

from mergeaudit.merging.methods import gta, interpolation, sparse_aware  # noqa: F401

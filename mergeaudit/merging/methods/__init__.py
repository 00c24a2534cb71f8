"""Merge methods; importing this package imports every module in it, and each module's
`@register` calls register its methods (so a new method is one new file here plus its tests).

gta            task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties,
               della, della_linear (mergekit's generalized task arithmetic presets)
interpolation  linear, slerp, nuslerp, model_stock; perturb_gaussian (a fragility probe)
sparse_aware   ram, ramplus_tl, disjoint_mean, fisher, sar
mergekit_more  multislerp, sce, karcher, arcee_fusion, nearswap, passthrough (mergekit 0.1.5)
subspace       tsv, iso_c, iso_cts (task-singular-vector and isotropic merging)
localize       consensus_ta, consensus_ties (TALL masks), localize_stitch (dataless)

`mergeaudit methods` lists every registered method with its reference.
"""

import importlib
import pkgutil

MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
for _name in MODULES:
    importlib.import_module(f"{__name__}.{_name}")

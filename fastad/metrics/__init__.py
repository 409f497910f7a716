"""fastad.metrics: the anomaly-detection metrics the four papers report, exact and fast.

    from fastad import metrics
    metrics.auroc(image_scores, image_labels)              # image level
    metrics.auroc(maps, masks)                             # pixel level (flattened)
    metrics.aupro(maps, masks)                             # exact, MVTec AD evaluation code
    metrics.aupro(maps, masks, num_thresholds=200)         # cflow-ad style, as DictAS / InCTRL report
    metrics.region_f1(maps, masks)                         # SAA+ region F1-max
    metrics.evaluate(image_scores, maps, image_labels, masks)   # all of them, in a dict

Inputs are torch tensors (CPU or CUDA) or numpy arrays; results are Python floats.
CPU inputs run the C++ kernels of fastad._C; CUDA inputs (and builds without
fastad._C) run the PyTorch reference in fastad.metrics._reference.
"""
from __future__ import annotations

from fastad.metrics._api import aupro, auroc, average_precision, evaluate, f1_max, region_f1
from fastad.metrics._inputs import UndefinedMetricError

__all__ = ["auroc", "average_precision", "f1_max", "aupro", "region_f1", "evaluate", "UndefinedMetricError"]

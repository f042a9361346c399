"""`classify`, the op converters end a classifier with: the top class and the scores by class.

Outputs: the label of the highest score (ties: the first), and the scores themselves (the program types
them as a dictionary; here they stay an array in the order of `classes`, and the evaluator pairs them with
the class names, see quality/evaluate/program.py). A batch of N gives N labels and [N, K] scores.
"""

from __future__ import annotations

import numpy as np

from mlqpipe.quality.mil.base import Refuse, floats, row


def classify(probabilities, classes):
    p = floats(probabilities)
    names = np.asarray(list(classes) if isinstance(classes, (list, tuple)) else classes).reshape(-1)
    k = names.size
    if p.ndim == 0 or p.shape[-1] != k or (p.ndim > 2) or (p.ndim == 2 and p.shape[0] < 1):
        raise Refuse(f"probabilities of shape {list(p.shape)} for {k} classes")
    scores = p.reshape(-1, k)
    top = names[np.argmax(scores, axis=1)]
    if p.ndim == 1 or scores.shape[0] == 1:
        return top.reshape(()), scores.reshape(k) if p.ndim == 1 else scores
    return top, scores


OPS = {"classify": row(classify)}

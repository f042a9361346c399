"""MIL's scaled_dot_product_attention (iOS18): softmax(Q·Kᵀ / sqrt(E) + mask) · V over the last two axes,
the leading axes broadcast. A bool mask keeps the scores where it is true (the others get -inf); a float
mask is added. A query row whose every score is masked out (softmax of nothing) is refused."""

from __future__ import annotations

import numpy as np

from mlqpipe.quality.mil.base import Refuse, floats, row


def _scaled_dot_product_attention(query, key, value, attn_mask=None):
    q, k, v = floats(query), floats(key), floats(value)
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise Refuse(f"query {list(q.shape)}, key {list(k.shape)} and value {list(v.shape)} do not fit")
    if k.shape[-2] == 0 or q.shape[-1] == 0:  # softmax of no scores; a scale of 1/sqrt(0)
        raise Refuse(f"key {list(k.shape)}: no keys or an empty embedding")
    try:
        scores = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(np.float32(q.shape[-1]))
    except ValueError:
        raise Refuse(f"query {list(q.shape)} and key {list(k.shape)} whose leading axes do not broadcast") from None
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        try:
            if m.dtype == np.bool_:
                scores = np.where(m, scores, np.float32(-np.inf))
            else:
                scores = scores + floats(m)
        except ValueError:
            raise Refuse(f"attn_mask of shape {list(m.shape)} for scores of shape {list(scores.shape)}") from None
    if scores.shape[-1] == 0:  # the mask broadcast the keys away
        raise Refuse(f"attn_mask of shape {list(np.shape(attn_mask))} leaves no keys")
    top = scores.max(axis=-1, keepdims=True)
    if np.any(np.isneginf(top)):
        raise Refuse("a query whose every key is masked out")
    e = np.exp(scores - top)
    try:
        return (e / e.sum(axis=-1, keepdims=True)) @ v
    except ValueError:
        raise Refuse(f"value {list(v.shape)} whose leading axes do not broadcast with the scores {list(e.shape)}") from None


OPS = {"scaled_dot_product_attention": row(_scaled_dot_product_attention)}

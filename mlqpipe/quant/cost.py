"""kmeans1d's cost of one cluster from prefix sums, in one place: kmeans.py runs it on numpy arrays and
kmeans_jit.py compiles it, and both must do exactly these float64 operations in this order for their LUTs to
be bit-identical with coremltools' kmeans1d."""


def cluster_cost(cw_i, cs_i, cq_i, cw_j, cs_j, cq_j):
    """Cost of the cluster j..i from the prefix sums of weights, weighted values and weighted squares."""
    w = cw_i - cw_j
    s = cs_i - cs_j
    mu = s / w
    r = cq_i - cq_j
    t = mu * mu
    t *= w
    r += t
    mu *= 2
    mu *= s
    r -= mu
    return r

"""kmeans1d's cost of one cluster from prefix sums: kmeans.py runs it on numpy arrays, and _kmeans1d.c's
cluster_cost does exactly these float64 operations in this order (change both together), so that both
paths' LUTs are bit-identical with coremltools' kmeans1d."""


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

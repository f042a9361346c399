"""Placeholder until the validity check lands."""


def raise_on_errors(spec, where=""):
    return None

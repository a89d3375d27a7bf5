"""Empirical privacy checks with canaries: run the attack (:mod:`.empirical`) and bound it (:mod:`.stats`).

Complements the accountant-based audit in :mod:`fed_nessa.privacy.audit`: the
accountant gives an upper bound on epsilon; canaries give an empirical lower
bound that must not exceed it.
"""

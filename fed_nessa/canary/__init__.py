"""Empirical privacy checks with canaries: run the attack (:mod:`.empirical`) and bound it (:mod:`.stats`).

:mod:`.federated` plants canaries into a federation's devices before a real run and scores
the aligner the run released (the runs themselves: :mod:`fed_nessa.sim.canary_audit`).

Complements the accountant-based audit in :mod:`fed_nessa.privacy.audit`: the
accountant gives an upper bound on epsilon; canaries give an empirical lower
bound that must not exceed it. It trains models and reads devices' data, so it sits
above the accounting package (it imports :mod:`fed_nessa.privacy`, :mod:`fed_nessa.model`
and :mod:`fed_nessa.data`; none of them imports it: layer rules in pyproject.toml).
"""

"""Privacy: DP events, accountants, signed hash-chained ledgers, budgets and the audit.

Layout follows ``opacus/accountants`` and ``dp_accounting``: immutable events
(:mod:`.events`) are the record; accountants (:mod:`.accounting`) replay them;
ledgers (:mod:`.ledger`, built on :mod:`.chain` and :mod:`.signing`) make the
record tamper-evident; :mod:`.budget` decides whether a device may join a
round; :mod:`.statement` says what the guarantee is; :mod:`.audit` verifies all
of it from the files alone (:mod:`.audit.report` writes the evidence).

The package only accounts: it never trains a model or reads data (a layer rule in
pyproject.toml). The canary experiments that do both live above it, in
:mod:`fed_nessa.canary`.
"""

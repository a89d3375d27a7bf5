"""Privacy: DP events, accountants, signed hash-chained ledgers, budgets and the audit.

Layout follows ``opacus/accountants`` and ``dp_accounting``: immutable events
(:mod:`.events`) are the record; accountants (:mod:`.accounting`) replay them;
ledgers (:mod:`.ledger`, built on :mod:`.chain` and :mod:`.signing`) make the
record tamper-evident; :mod:`.budget` decides whether a device may join a
round; :mod:`.statement` says what the guarantee is; :mod:`.audit` verifies all
of it from the files alone (:mod:`.audit_report` writes the evidence);
:mod:`.empirical` runs a canary attack on DP-SGD training and
:mod:`.canary_stats` turns its guesses into an epsilon lower bound.
"""

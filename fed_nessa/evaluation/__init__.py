"""Evaluation: the trial protocol, centralised reference training and reference tables.

Sits above :mod:`fed_nessa.model`; the EER validator used for early stopping
lives in :mod:`.validators` and is injected into training by the caller.
"""

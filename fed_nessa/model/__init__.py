"""Model: aligners, losses, local training and on-disk artifacts.

Never imports :mod:`fed_nessa.evaluation`: training takes its validator by
injection (:class:`fed_nessa.model.training.Validator`), so evaluation can sit
above the model it measures.
"""

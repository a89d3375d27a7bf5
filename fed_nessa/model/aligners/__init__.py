"""Aligners behind one interface (see :mod:`fed_nessa.model.aligners.base`)."""

from fed_nessa.model.aligners.base import Aligner, AlignerInfo, load_aligner
from fed_nessa.model.aligners.linear import NaiveAligner, ProcrustesAligner, RidgeAligner, RidgeStats, ridge_from_stats
from fed_nessa.model.aligners.nessa import NessaAligner, NessaConfig, NessaNet, NessaSharedAligner
from fed_nessa.model.aligners.speaker_logit import SpeakerLogitAligner

__all__ = [
    "Aligner", "AlignerInfo", "load_aligner", "NaiveAligner", "ProcrustesAligner", "RidgeAligner",
    "RidgeStats", "ridge_from_stats", "NessaAligner", "NessaConfig", "NessaNet", "NessaSharedAligner",
    "SpeakerLogitAligner", "make_aligner",
]


def make_aligner(method: str, info: AlignerInfo, **kwargs: object) -> Aligner:
    """Construct an aligner by its method name (clear error listing the choices)."""
    cls = Aligner.registry.get(method)
    if cls is None:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(Aligner.registry)}")
    return cls(info, **kwargs)  # type: ignore[arg-type]

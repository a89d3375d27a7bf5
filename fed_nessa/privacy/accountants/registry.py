"""Accountant name -> accountant class (the shape of Opacus' ``accountants/registry.py``).

Adding an accountant is one module with an :class:`~.accountant.Accountant` subclass and one
line here. Ledgers, budgets, calibration, the audit and the canary audits look accountants up
by name through :func:`create_accountant`; nothing else branches on the name.
"""

from __future__ import annotations

from fed_nessa.privacy.accountants.accountant import Accountant
from fed_nessa.privacy.accountants.gaussian import GaussianAccountant
from fed_nessa.privacy.accountants.pld import PLDAccountant
from fed_nessa.privacy.accountants.prv import PRVAccountant
from fed_nessa.privacy.accountants.rdp import RDPAccountant
from fed_nessa.privacy.accountants.skellam import SkellamAccountant

ACCOUNTANT_REGISTRY: dict[str, type[Accountant]] = {
    RDPAccountant.name: RDPAccountant,
    PRVAccountant.name: PRVAccountant,
    PLDAccountant.name: PLDAccountant,
    GaussianAccountant.name: GaussianAccountant,
    SkellamAccountant.name: SkellamAccountant,
}

#: The accountants that cover every history (subsampled or not): what a device may budget with,
#: a ledger may report and the audit may compare. The closed-form Gaussian is a reference only.
ACCOUNTANTS: tuple[str, ...] = tuple(name for name, cls in ACCOUNTANT_REGISTRY.items() if cls.subsampled)


def create_accountant(name: str) -> Accountant:
    """The accountant registered as ``name``; an unknown name is one clear error listing the known ones."""
    try:
        cls = ACCOUNTANT_REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"accountant must be one of {tuple(ACCOUNTANT_REGISTRY)}, got {name!r}") from None
    return cls()

"""Accountants behind one interface (:mod:`.accountant`) and a registry (:mod:`.registry`).

One module per accountant: :mod:`.rdp` (Opacus RDP, the default), :mod:`.prv` (Opacus PRV),
:mod:`.pld` (Google dp_accounting PLD), :mod:`.gaussian` (the closed form for q = 1 sums) and
:mod:`.skellam` (RDP at more orders, for histories with the integer mechanism).
"""

from fed_nessa.privacy.accountants.accountant import Accountant, History, history
from fed_nessa.privacy.accountants.gaussian import GAUSSIAN
from fed_nessa.privacy.accountants.pld import PLD
from fed_nessa.privacy.accountants.prv import PRV
from fed_nessa.privacy.accountants.rdp import RDP
from fed_nessa.privacy.accountants.registry import ACCOUNTANT_REGISTRY, ACCOUNTANTS, create_accountant
from fed_nessa.privacy.accountants.skellam import SKELLAM_ACCOUNTANT

__all__ = ["ACCOUNTANTS", "ACCOUNTANT_REGISTRY", "GAUSSIAN", "PLD", "PRV", "RDP", "SKELLAM_ACCOUNTANT", "Accountant",
           "History", "create_accountant", "history"]

"""The integer mechanism's accountant: RDP at Opacus' orders and every integer order up to 256.

A history with :data:`~fed_nessa.privacy.events.SKELLAM` events composes by adding RDP curves
(the Skellam bound of :mod:`fed_nessa.privacy.skellam` beside the Gaussian's), as the ``rdp``
accountant does; this one also evaluates the integer orders 64..256, where the optimum lies for
small epsilons, so it is never above ``rdp`` on the same history (its orders are a superset). PLD,
PRV and the closed-form Gaussian have no Skellam mechanism and refuse such a history; the audit's
independent check of a skellam event is the divergence summed numerically
(:func:`fed_nessa.privacy.skellam.audit_release`).
"""

from __future__ import annotations

from fed_nessa.privacy.accountants.rdp import RDP_ORDERS, RDPAccountant

SKELLAM_ACCOUNTANT = "skellam"
#: Opacus' orders plus the integers 64..256 (the Skellam bound's own range).
SKELLAM_RDP_ORDERS: tuple[float, ...] = tuple(sorted({*RDP_ORDERS, *range(64, 257)}))


class SkellamAccountant(RDPAccountant):
    """RDP over Gaussian and Skellam events at :data:`SKELLAM_RDP_ORDERS`."""

    name = SKELLAM_ACCOUNTANT
    orders = SKELLAM_RDP_ORDERS

"""The privacy audit: verify ledgers and recompute every epsilon from the files alone.

Split in four so each part can change alone, with imports running one way
(``verify -> report -> findings``, ``verify -> anchors -> findings``):

- :mod:`.findings`: severities, tolerances and the result types;
- :mod:`.verify`: the checks and :func:`audit`, the entry point;
- :mod:`.anchors`: the checks that hold two parties' signed records against each other (ledger
  heads, the end-of-run record, public parameters, participant counts, the noise source);
- :mod:`.report`: renders an :class:`AuditResult` as ``audit.json``, ``report.md`` and plots.

``from fed_nessa.privacy.audit import audit`` is the public way in.
"""

from fed_nessa.privacy.audit.findings import AuditResult, DeviceAudit, Finding
from fed_nessa.privacy.audit.verify import audit

__all__ = ["AuditResult", "DeviceAudit", "Finding", "audit"]

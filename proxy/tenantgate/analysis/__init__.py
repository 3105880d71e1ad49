"""tenantgate's SQL analyser: pure functions over libpg_query parse trees.

Given a query string and an :class:`AnalysisPolicy`, :func:`analyse_sql` says
whether every statement in it may run for *some* tenant and what must hold for
*this* tenant (constants that must equal it: :func:`check_tenant`; ``$n``
parameters whose Bind value must equal it: :func:`tenant_param_matches`).  The
analysis is tenant independent, so :class:`AnalysisCache` shares it by text.

Modules: ``parse`` (text -> JSON statements), ``classes`` (statement-class
allow-list), ``settings`` (SET/RESET), ``walker`` (query levels, scoping,
proofs), ``predicates`` (what a proof looks like), ``writes`` (INSERT/UPDATE/
DELETE), ``relations`` (table resolution, catalog lists), ``functions``
(function deny rules), ``params`` (Bind values), ``cache``, ``shapes`` (analyses
shared by texts that differ only in constants), ``normalize``.
"""

from .analyser import CompiledPolicy, analyse_sql, check_tenant, compile_policy, explain_verdict
from .cache import AnalysisCache
from .model import Analysis, AnalysisPolicy, Rejection, StatementAnalysis
from .normalize import fingerprint, normalize
from .params import matches_as_bytes, tenant_param_matches

__all__ = [
    "Analysis",
    "AnalysisCache",
    "AnalysisPolicy",
    "CompiledPolicy",
    "Rejection",
    "StatementAnalysis",
    "analyse_sql",
    "check_tenant",
    "compile_policy",
    "explain_verdict",
    "fingerprint",
    "matches_as_bytes",
    "normalize",
    "tenant_param_matches",
]

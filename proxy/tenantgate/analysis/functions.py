"""Function-call rules: which function names a tenant may call.

Hybrid policy, matched on the **last name component, lowercased**, regardless of
schema (``pg_catalog.set_config``, ``public.set_config`` and ``"Set_Config"`` are
all ``set_config``; fail closed):

1. ``policy.denied_functions`` -> denied (wins over everything).
2. ``policy.allowed_functions`` -> allowed.
3. :data:`DENIED_NAMES` / :data:`DENIED_PREFIXES` -> denied: functions that run
   SQL hidden in a string (``query_to_xml``, ``ts_stat``, tablefunc's
   ``crosstab``/``connectby``, xml2's ``xpath_table``, aws_s3 exports), change
   settings (``set_config``), reach other servers (``dblink*``,
   ``postgres_fdw_*``, ``http*``), large objects (``lo_*``), sequences shared
   by all tenants (``setval``), page/heap inspection and statistics.
4. Every ``pg_*`` name is denied unless in :data:`PG_ALLOWED` (introspection
   helpers drivers and ORMs use).  This covers file access, advisory locks,
   signalling backends, sleeping, notify, reloads and statistics readers.
5. Anything else is allowed: ordinary built-ins and *user-defined functions*.
   User-defined functions are the operator's responsibility (SECURITY DEFINER
   functions bypass RLS): list them in ``denied_functions``.
"""

from __future__ import annotations

from .model import AnalysisPolicy

DENIED_NAMES: frozenset[str] = frozenset(
    {
        "set_config",
        "ts_stat",
        "ts_rewrite",
        "loread",
        "lowrite",
        "setval",
        "xpath_table",
        "connectby",
        "http",
        "get_raw_page",
        "heap_page_items",
        "heap_tuple_infomask_flags",
        "page_header",
        "page_checksum",
        "tuple_data_split",
        "fsm_page_contents",
        "verify_heapam",
        "pgrowlocks",
        "txid_current_snapshot",
        "gin_clean_pending_list",
    }
)

DENIED_PREFIXES: tuple[str, ...] = (
    "query_to_",
    "query_export",
    "table_to_",
    "table_import",
    "cursor_to_",
    "schema_to_",
    "database_to_",
    "dblink",
    "lo_",
    "postgres_fdw",
    "binary_upgrade",
    "http_",
    "crosstab",
    "pgstat",
    "bt_",
    "brin_",
    "hash_page",
    "gist_page",
    "gin_page",
    "gin_metapage",
    "gin_leafpage",
)

#: ``pg_*`` functions that only describe schema objects or this session.
PG_ALLOWED: frozenset[str] = frozenset(
    {
        "pg_typeof",
        "pg_collation_for",
        "pg_get_expr",
        "pg_get_constraintdef",
        "pg_get_indexdef",
        "pg_get_userbyid",
        "pg_get_viewdef",
        "pg_get_ruledef",
        "pg_get_triggerdef",
        "pg_get_functiondef",
        "pg_get_function_arguments",
        "pg_get_function_identity_arguments",
        "pg_get_function_result",
        "pg_get_function_arg_default",
        "pg_get_function_sqlbody",
        "pg_get_serial_sequence",
        "pg_get_keywords",
        "pg_get_partkeydef",
        "pg_get_partition_constraintdef",
        "pg_get_statisticsobjdef",
        "pg_get_statisticsobjdef_columns",
        "pg_get_statisticsobjdef_expressions",
        "pg_get_catalog_foreign_keys",
        "pg_table_is_visible",
        "pg_type_is_visible",
        "pg_function_is_visible",
        "pg_operator_is_visible",
        "pg_opclass_is_visible",
        "pg_opfamily_is_visible",
        "pg_collation_is_visible",
        "pg_conversion_is_visible",
        "pg_statistics_obj_is_visible",
        "pg_ts_config_is_visible",
        "pg_ts_dict_is_visible",
        "pg_ts_parser_is_visible",
        "pg_ts_template_is_visible",
        "pg_encoding_to_char",
        "pg_char_to_encoding",
        "pg_client_encoding",
        "pg_encoding_max_length",
        "pg_column_size",
        "pg_column_compression",
        "pg_size_pretty",
        "pg_size_bytes",
        "pg_backend_pid",
        "pg_is_in_recovery",
        "pg_postmaster_start_time",
        "pg_conf_load_time",
        "pg_current_xact_id",
        "pg_current_xact_id_if_assigned",
        "pg_xact_status",
        "pg_trigger_depth",
        "pg_jit_available",
        "pg_my_temp_schema",
        "pg_is_other_temp_schema",
        "pg_has_role",
        "pg_input_is_valid",
        "pg_input_error_info",
        "pg_relation_is_updatable",
        "pg_column_is_updatable",
        "pg_index_column_has_property",
        "pg_index_has_property",
        "pg_indexam_has_property",
        "pg_indexam_progress_phasename",
        "pg_describe_object",
        "pg_identify_object",
        "pg_identify_object_as_address",
        "pg_get_object_address",
        "pg_options_to_table",
        "pg_tablespace_location",
        "pg_listening_channels",
        "pg_basetype",
        "pg_settings_get_flags",
        "pg_numa_available",
    }
)


class FunctionRules:
    """Compiled function rules for one policy."""

    __slots__ = ("_allowed", "_denied")

    def __init__(self, policy: AnalysisPolicy) -> None:
        self._denied = frozenset(n.lower() for n in policy.denied_functions)
        self._allowed = frozenset(n.lower() for n in policy.allowed_functions)

    def is_denied(self, name: str) -> bool:
        """True when a call to ``name`` (last component, any case) is refused."""
        name = name.lower()
        if name in self._denied:
            return True
        if name in self._allowed:
            return False
        if name in DENIED_NAMES or name.startswith(DENIED_PREFIXES):
            return True
        return name.startswith("pg_") and name not in PG_ALLOWED

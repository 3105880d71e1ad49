"""Helpers shared by the test suite: the PostgreSQL fixtures' machinery.

``cluster_for_tests`` picks the server (``TENANTGATE_TEST_DSN`` or a temporary
cluster selected by ``TENANTGATE_TEST_PG``), ``db`` builds the tenant test
database and policies, ``loopguard`` turns unhandled event-loop exceptions into
test failures.  ``proxy.py`` (the in-process proxy fixture) belongs to the lead.
"""

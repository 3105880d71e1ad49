"""Sans-IO PostgreSQL protocol 3.0/3.2 codec: framing, first packets and typed messages.

Nothing in this package touches sockets or the event loop: readers are fed bytes
and hand back messages; encoders return bytes.  Malformed input only ever raises
:class:`tenantgate.errors.RemoteProtocolError`.
"""

"""Session: the daemon's own MQTT 5 client on the ``mqtt5`` codec.

transport (TCP, TLS, WebSocket), mqtt (the connection and its packets), source (the session:
subscribe, hold until acknowledged, reconnect, pause at the cap). May import ``ops`` and
``decode.records`` (the session builds ``records.Inbound``); never ``store`` or ``repair``.
"""

"""Repair: what the live stream missed, fetched over flespi's REST API.

rest (REST over MQTT), rest_carrier (that REST on the daemon's session or a standalone
aiomqtt one), backfill, reconcile, resync (planning and electing one repairer), replay (dead
letters written again). May import ``decode``, ``store``, ``session`` and ``ops``.
"""

"""Decode: what a flespi topic and payload mean, and the typed record each becomes.

topics (routing a topic to its family), families (each topic family declared once), builders
(one record per family), payloads (JSON and the typed track), records (the domain's data).
Pure functions over bytes and strings: imports nothing else of ``mirror``; everything else
imports ``decode.records``.
"""

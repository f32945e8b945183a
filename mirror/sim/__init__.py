"""Sim: a flespi stand-in for tests, benchmarks and the quick start.

traffic (realistic publications), simulate (publishing them to a broker), rest_responder
(flespi's REST API over MQTT, answered from a simulated account). May import ``decode`` and
``ops``; the product never imports ``sim`` (but ``ops`` names simulate's options, lazily).
"""

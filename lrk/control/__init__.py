"""Control protocols (sans-IO): the msgpack protocol and the legacy lrkproxy text protocol."""

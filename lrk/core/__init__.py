"""Sans-IO core: the session table, port allocator and SDP rewriting. No sockets, no clocks."""

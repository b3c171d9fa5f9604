"""The relay daemon: I/O shells around the sans-IO core (control sockets, timers, data plane)."""

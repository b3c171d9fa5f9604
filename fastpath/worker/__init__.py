"""Code of the worker process (`python -m fastpath.worker.loop`): the relay table, batched
socket I/O (recvmmsg/sendmmsg), AF_PACKET taps and raw egress. Never runs in the daemon."""

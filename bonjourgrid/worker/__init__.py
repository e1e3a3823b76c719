"""The worker: a pure peer state machine (core) and the daemon that drives it."""

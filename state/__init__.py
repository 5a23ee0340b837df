"""State shared by several instances of the service (Redis) with the in-process stand-in it falls back to."""

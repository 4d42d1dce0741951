"""tether.nn."""

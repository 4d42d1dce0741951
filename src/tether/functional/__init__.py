"""tether.functional."""

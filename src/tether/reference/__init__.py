"""tether.reference."""

"""Site data: reading and validating sections, the built-in synthetic federation."""

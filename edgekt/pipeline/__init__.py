"""The one-command pipeline: teacher -> students -> export -> parity -> profile -> report."""

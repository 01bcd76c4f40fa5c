"""homescale: netmap."""

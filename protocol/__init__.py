"""homescale: protocol."""

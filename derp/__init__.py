"""homescale: derp."""

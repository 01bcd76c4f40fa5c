"""homescale: appliance."""

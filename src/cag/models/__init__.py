"""The model layer: conditioning, token layout, attention, positions, codec and the CAG model itself."""

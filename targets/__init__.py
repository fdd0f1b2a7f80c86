"""Target presets (JSON data), shipped inside the wheel as tsm_edge.presets."""

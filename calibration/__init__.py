"""Calibration data and formats, shipped inside the wheel as tsm_edge.calibration_data."""

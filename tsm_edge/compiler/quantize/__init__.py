"""int8: calibration on real frames (``calibrate``), its file format (``calibration``), the
integer multiply-add instructions per ISA (``isa``) and the quantized step (``int8``).
"""

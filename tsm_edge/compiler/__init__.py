"""Stage 3, compiler: the rewritten step through TVM to an executable and an artifact directory.

``api`` is ``tsm_edge.compile``; ``tvm/`` is the thin layer over TVM's compiler API; ``schedules``
holds the default CPU rules; ``quantize/`` the int8 path and its calibration; ``tuning`` the
MetaSchedule records; ``targets`` the presets.
"""

"""Measuring artifacts: verify, bench, probe, profile, drift, soak, plots and the ONNX Runtime
baselines. Never imports ``compiler``: what is measured is the artifact.
"""

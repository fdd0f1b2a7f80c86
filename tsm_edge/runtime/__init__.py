"""Stage 5, runtime: streaming frames through an artifact. Imports only ``artifact``, ``errors``
and ``support``, never torch or TVM's compiler: these files are what a package ships.
"""

"""Stage 4, artifact: the manifest's types and checks (``manifest``), the artifact folder and the
files it lists (``store``), and the standalone package (``package``). Imports nothing
compile-side: a board reads it with the runtime alone.
"""

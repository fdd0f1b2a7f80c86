"""The thin layer over TVM's compiler API (pinned: apache-tvm 0.27.0.post1, apache-tvm-ffi
0.1.14.post1). TVM's Python API changed in 0.20, 0.22 and 0.24; every compile-side TVM call goes
through these modules (and ``compiler/schedules.py``), so the next change lands here.
"""

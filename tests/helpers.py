"""Helpers the tests share (fixtures live in ``conftest.py``): import them from here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

TINY_SIZE = 64

# Tools some tests need, with the Debian package that provides each (.ci/run installs them all).
TOOL_PACKAGES = {
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "qemu-aarch64-static": "qemu-user-static",
    "clang": "clang",
    "nvcc": "nvidia-cuda-toolkit",
    "cc": "gcc",
    "readelf": "binutils",
    "/usr/lib/llvm-16/bin/llvm-mca": "llvm-16",
}


def disassembly(path, tool="objdump") -> str:
    """``tool -d`` of a library, without raw bytes: "addr:\tmnemonic\toperands" lines."""
    return subprocess.run([tool, "-d", "--no-show-raw-insn", str(path)], capture_output=True,
                          text=True, check=True).stdout


def missing_tools(tools) -> list[str]:
    """The tools of ``tools`` not on PATH (a probe: never raises)."""
    import shutil

    return [t for t in tools if shutil.which(t) is None]


def eager_stream(model, frames, layout: str | None = None, caches: bool = False):
    """The PyTorch reference: one frame per call, each TemporalShift keeping its own past.

    Returns the logits (T, K), and with ``caches=True`` also each frame's caches by name.
    """
    import torch

    from tsm_edge.models.shift import set_online_layout, set_shift_mode, shift_modules

    if layout is not None:
        set_online_layout(model, layout)
    set_shift_mode(model, "stream")
    shifts = shift_modules(model)
    logits, seen = [], []
    try:
        with torch.no_grad():
            for f in frames:
                logits.append(model(torch.from_numpy(f[None])).numpy().reshape(-1))
                seen.append({n: m._past.numpy().copy() for n, m in shifts})
    finally:
        set_shift_mode(model, "online")
    return (np.stack(logits), seen) if caches else np.stack(logits)


BLOCK_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['run.py'] + "
               "sys.argv[1:]; runpy.run_path('run.py', run_name='__main__')")


def run_packaged(dest, *args: str, timeout: float = 300):
    """Run an unpacked package's ``run.py`` in ``dest`` as a board would, torch blocked."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], cwd=dest,
                          capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None):
    """Run the real ``tsm-edge`` command in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tsm_edge.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def assert_same_logits(a: Path, b: Path, frames_npy, tmp_path: Path) -> None:
    """Two artifacts of the same model stream the same frames to the same logits."""
    logits = []
    for art in (a, b):
        out = tmp_path / f"{art.name}.npy"
        proc = run_cli("run", str(art), "--frames-npy", str(frames_npy), "--save-logits",
                       str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        logits.append(np.load(out))
    assert logits[0].shape[0] == np.load(frames_npy).shape[0]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def write_synthetic_video(path: Path, frames: int = 50, size=(160, 120), fps: int = 25) -> Path:
    """A few seconds of moving shapes, encoded with PyAV (mpeg4)."""
    import av

    w, h = size
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        yy, xx = np.mgrid[0:h, 0:w]
        for t in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 2] = (xx * 255 // w).astype(np.uint8)               # static gradient
            cx, cy = 10 + 3 * t % (w - 20), h // 2 + int(20 * np.sin(t / 5))
            img[(abs(xx - cx) < 12) & (abs(yy - cy) < 12)] = (255, 40, 40)  # moving square
            r = 8 + t % 10
            img[(xx - (w - 30)) ** 2 + (yy - 30) ** 2 < r * r] = (40, 255, 40)  # pulsing disc
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def shifted_prefixes(model):
    """The module names of the blocks that hold a TemporalShift."""
    from tsm_edge.models.shift import shift_modules

    return {name.rsplit(".shift", 1)[0] for name, _ in shift_modules(model)}


def to_official(model, family):
    """``model``'s weights as the official offline training code saves them (bi-directional:
    ``module.base_model...``, ``.net.`` inside shifted convolutions, ``new_fc``)."""
    import re

    shifted = shifted_prefixes(model)
    out = {}
    for k, v in model.state_dict().items():
        block = ".".join(k.split(".")[:2])
        if family == "resnet50" and block in shifted and k.startswith(block + ".conv1."):
            k = k.replace(".conv1.", ".conv1.net.")
        if family == "mobilenetv2" and block in shifted and k.startswith(block + ".conv.0."):
            k = k.replace(".conv.0.", ".conv.0.net.")
        k = re.sub(r"^(fc|classifier)\.", "new_fc.", k)
        out["module." + (k if k.startswith("new_fc.") else "base_model." + k)] = v
    return {"epoch": 50, "arch": family, "state_dict": out, "best_prec1": 71.2}


# --------------------------------------------------------------------------- int8 kernels


# (NHWC input, kernel, output channels, strides, padding) of the exact-kernel checks
# (input shape, kernel, output channels, strides, padding, depthwise)
INT8_CASES = [
    ((1, 14, 14, 32), (1, 1), 48, (1, 1), (0, 0, 0, 0), False),    # pointwise
    ((1, 15, 15, 16), (3, 3), 32, (2, 2), (1, 1, 1, 1), False),    # strided 3x3, odd size
    ((1, 8, 8, 64), (3, 3), 16, (1, 1), (1, 1, 1, 1), False),      # 3x3, few output channels
    ((1, 9, 9, 48), (3, 3), 48, (1, 1), (1, 1, 1, 1), True),       # depthwise
    ((1, 15, 15, 32), (3, 3), 32, (2, 2), (1, 1, 1, 1), True),     # depthwise, strided, odd
    ((1, 7, 7, 40), (5, 5), 40, (1, 1), (2, 2, 2, 2), True),       # depthwise 5x5, channel tail
]


def int8_conv_module(isa, target_spec: dict, shape, kernel, out_channels, strides, padding,
                     depthwise=False):
    """One integer convolution scheduled by the int8 rule for ``target_spec``: (module, target,
    what the rule did)."""
    import tvm

    from tsm_edge.compiler import schedules
    from tsm_edge.compiler.quantize import int8

    if depthwise:
        assert out_channels == shape[-1]
        func = int8.depthwise_prim_func(isa, shape, kernel, strides, padding)
    else:
        func = int8.conv_prim_func(isa, shape, kernel, out_channels, strides, padding)
    target = tvm.target.Target(target_spec)
    sch, what = schedules.schedule_primfunc(func, target)
    assert what is not None and what["rule"] == "convolution-int8", what
    mod = tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})
    return mod, target, what


def int8_weights_operand(isa, w_hwio, depthwise=False):
    """The weights as the integer convolution takes them: packed for the dot-product
    instruction, or a depthwise convolution's [kh, kw, 1, C] as they are."""
    from tsm_edge.compiler.quantize import int8

    return w_hwio if depthwise else int8.pack_weights(w_hwio, isa.lanes)


def int8_reference(x_stored, w_hwio, strides, padding, zero_point, depthwise=False):
    """Integer convolution in numpy: padded with the zero point, summed in int64. Depthwise:
    ``w_hwio`` is [kh, kw, 1, C], each channel its own filter."""
    pt, pl, pb, pr = padding
    x = np.pad(x_stored.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)),
               constant_values=zero_point)
    kh, kw, _c, o = w_hwio.shape
    sh, sw = strides
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    out = np.zeros((1, ho, wo, o), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + sh * ho:sh, j:j + sw * wo:sw, :]
            if depthwise:
                out += patch * w_hwio[i, j, 0].astype(np.int64)
            else:
                out += np.einsum("nhwc,co->nhwo", patch, w_hwio[i, j].astype(np.int64))
    return out


def extreme_operands(isa, shape, kernel, out_channels, seed=0, depthwise=False):
    """(stored input, HWIO int8 weights) with the ranges' extremes: a corner of the input at
    the largest stored magnitude (255 unsigned, -127 signed), the first two output channels'
    weights at +-weight_max (the worst case for an int16 pair: 255 * 63 * 2, 127 * 127 * 2).
    Depthwise weights ([kh, kw, 1, C]) take all 8 bits on every ISA; a whole channel at the
    extremes sums 255 * 127 (or 127 * 127) over every tap."""
    from tsm_edge.compiler.quantize.int8 import DEPTHWISE_WEIGHT_MAX

    rng = np.random.default_rng(seed)
    if isa.data_dtype == "uint8":
        x = rng.integers(0, 256, shape).astype(np.uint8)
        x.flat[:64] = 255
        x[..., 0] = 255
    else:
        x = rng.integers(-127, 128, shape).astype(np.int8)
        x.flat[:64] = -127
        x.flat[64:128] = 127
        x[..., 0] = -127
    wmax = DEPTHWISE_WEIGHT_MAX if depthwise else isa.weight_max
    w = rng.integers(-wmax, wmax + 1,
                     (*kernel, 1 if depthwise else shape[-1], out_channels)).astype(np.int8)
    w[..., 0] = wmax
    w[..., 1] = -wmax
    return x, w


# A user's ResNet-style model file (torchvision names, no shift) for --model-file: at 64 px its
# 3x3 convolutions at 32x32 (16 channels) and 16x16 (32) take the Winograd form.
RESNET_LIKE_FILE = textwrap.dedent('''
    """A user's own ResNet-style model (torchvision names), no shift."""
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                             nn.BatchNorm2d(cout)) if stride != 1 else None)

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu = nn.ReLU()
            self.layer1 = nn.Sequential(Block(16, 16), Block(16, 32, 2))
            self.fc = nn.Linear(32, 6)

        def forward(self, x):
            x = self.layer1(self.relu(self.bn1(self.conv1(x))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


    def build():
        return Net()


    class Gate(nn.Module):
        def forward(self, x):
            return x if x.mean() > 0 else -x


    def untraceable():
        net = Net()
        net.layer1[0].relu = Gate()
        return net
''')

"""Target presets as data: one JSON file per device in ``targets/`` (shipped in the wheel).

A preset names what TVM does not know on its own: the host triple, the cross compiler, the library
format, the default precision, the RPC key and whether an artifact for it can run on this machine.
Users add presets by dropping a JSON file in ``$TSM_EDGE_TARGETS`` (a folder). A raw TVM target,
as a JSON object or a TVM tag, works too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from ..errors import UserError, unknown_choice
from ..support.platform import this_arch

USER_DIR_ENV = "TSM_EDGE_TARGETS"
_PRESET_KEYS = {"name", "description", "tvm_target", "tvm_tag", "host_triple", "cross_compiler",
                "cross_compiler_package", "needs_ndk", "library_format", "default_precision",
                "rpc_key", "device", "runnable"}


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    tvm_target: dict | str
    host_triple: str
    tvm_tag: str | None = None  # TVM tag the target starts from; tvm_target's keys override it
    cross_compiler: str | None = None
    cross_compiler_package: str | None = None  # the Debian package that provides it
    needs_ndk: bool = False
    library_format: str = "so"
    default_precision: str = "fp32"
    rpc_key: str | None = None
    device: str = "cpu"
    runnable: str = "here"  # "here", "board" or the reason it cannot be built
    extra: dict = field(default_factory=dict)

    def resolved_tvm_target(self) -> dict | str:
        """The TVM target: the tag's attributes, the preset's over them (the host replaced
        whole), and ``native`` replaced by this machine's CPU and triple."""
        spec = self.tvm_target
        if not isinstance(spec, dict):
            return spec
        from .tvm import target as tvm_target

        out = {}
        if self.tvm_tag:
            out = tvm_target.target_json(tvm_target.make_target(self.tvm_tag))
            out.pop("tag", None)
            out.pop("host", None)
            if out.get("kind") != spec.get("kind"):
                out = {}
        out.update(spec)
        if out.get("mcpu") == "native":
            out["mcpu"] = tvm_target.system_cpu()
        if out.get("mtriple") == "native":
            out["mtriple"] = native_triple()
        if out.get("num-cores") == "native":
            import os

            out["num-cores"] = len(os.sched_getaffinity(0))
        return out

    def with_cuda_arch(self, arch: str | None) -> TargetPreset:
        """The preset with its CUDA architecture settled: ``arch`` (``--cuda-arch``), else, for
        a preset whose arch is ``detect``, the GPU that ``nvidia-smi`` finds here."""
        spec = self.tvm_target
        if self.device != "cuda" or not isinstance(spec, dict):
            if arch is not None:
                raise UserError(f"--cuda-arch {arch} is for CUDA targets; {self.name} is a "
                                f"{self.device} target")
            return self
        if arch is not None and not re.fullmatch(r"sm_\d{2,3}[af]?", arch):
            raise UserError(f"--cuda-arch {arch} is not valid; give sm_XX, e.g. {CUDA_ARCH_HINT}")
        fixed = spec.get("arch")
        if fixed not in (None, "detect"):
            if arch is not None and arch != fixed:
                raise UserError(f"--cuda-arch {arch}: target {self.name} is built for {fixed}; "
                                "use the 'cuda' preset for another GPU")
            return self
        arch = arch or machine_cuda_arch()
        if arch is None:
            raise UserError(f"target {self.name} needs --cuda-arch sm_XX (e.g. "
                            f"{CUDA_ARCH_HINT}): nvidia-smi finds no NVIDIA GPU on this machine")
        return replace(self, tvm_target={**spec, "arch": arch})

    def resolved_host_triple(self) -> str:
        return native_triple() if self.host_triple == "native" else self.host_triple

    def resolved_cross_compiler(self, ndk: str | None = None) -> str | None:
        """The cross compiler's path or name; checked to exist, with the way to get it."""
        import shutil

        cc = self.cross_compiler
        if not cc:
            return None
        if self.needs_ndk:
            if not ndk:
                raise UserError(f"target {self.name} needs the Android NDK: pass --ndk PATH "
                                "(the folder holding toolchains/llvm)")
            if not Path(ndk).is_dir():
                raise UserError(f"--ndk {ndk} is not a folder; give the Android NDK's root")
            cc = cc.replace("{ndk}", str(Path(ndk).resolve()))
            if not Path(cc).is_file():
                raise UserError(f"--ndk {ndk} has no {cc}; give an NDK r21 or newer")
            return cc
        if shutil.which(cc) is None:
            how = (f" (Debian: apt-get install {self.cross_compiler_package})"
                   if self.cross_compiler_package else "")
            raise UserError(f"target {self.name} needs the cross compiler {cc}, which is not on "
                            f"PATH{how}")
        return cc


CUDA_ARCH_HINT = ("sm_90 for H100/H200, sm_89 for RTX 40xx and L4, sm_86 for RTX 30xx and A10, "
                  "sm_80 for A100")


def machine_cuda_arch() -> str | None:
    """The compute capability of this machine's first NVIDIA GPU as sm_XX, or None (a probe)."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"\s*(\d+)\.(\d+)", out)
    return f"sm_{match.group(1)}{match.group(2)}" if match else None


def native_triple() -> str:
    return f"{this_arch()}-linux-gnu"


def _preset_from_json(data: dict, source: str) -> TargetPreset:
    if not isinstance(data, dict) or "name" not in data or "tvm_target" not in data:
        raise UserError(f"target preset {source} must be a JSON object with at least 'name' and "
                        "'tvm_target'")
    known = {k: v for k, v in data.items() if k in _PRESET_KEYS}
    extra = {k: v for k, v in data.items() if k not in _PRESET_KEYS}
    known.setdefault("description", "")
    known.setdefault("host_triple", "native")
    if not isinstance(known.get("tvm_target"), (dict, str)):
        raise UserError(f"target preset {source}: 'tvm_target' must be a JSON object or a tag")
    return TargetPreset(**known, extra=extra)


def _preset_files() -> list[tuple[str, str]]:
    files = []
    pkg = resources.files("tsm_edge.presets")
    for entry in sorted(pkg.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            files.append((f"tsm_edge/presets/{entry.name}", entry.read_text()))
    user_dir = os.environ.get(USER_DIR_ENV)
    if user_dir and Path(user_dir).is_dir():
        for path in sorted(Path(user_dir).glob("*.json")):
            files.append((str(path), path.read_text()))
    return files


def list_presets() -> dict[str, TargetPreset]:
    presets: dict[str, TargetPreset] = {}
    for source, text in _preset_files():
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"target preset {source} is not valid JSON: {exc}") from None
        preset = _preset_from_json(data, source)
        presets[preset.name] = preset
    return presets


def resolve_target(name_or_spec: str | dict) -> TargetPreset:
    """A preset by name, or an ad-hoc preset around a raw TVM target (JSON object or tag)."""
    if isinstance(name_or_spec, dict):
        return _raw_preset(name_or_spec, json.dumps(name_or_spec))
    text = name_or_spec.strip()
    presets = list_presets()
    if text in presets:
        return presets[text]
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--target {text!r} is not valid JSON ({exc.msg}); give a preset "
                            f"({', '.join(sorted(presets))}), a TVM tag or a JSON target") from None
        return _raw_preset(spec, text)
    from .tvm import target as tvm_target

    if "/" in text:  # TVM tags look like vendor/device
        tags = tvm_target.list_tags()
        if text in tags:
            return _raw_preset(text, text)
        close = unknown_choice("TVM tag", text, tags)
        hint = str(close).split(";")[0]
        raise UserError(f"{hint}; valid: a preset ({', '.join(sorted(presets))}), one of TVM's "
                        f"{len(tags)} tags (list them with 'tsm-edge targets --tvm-tags'), or a "
                        "JSON target such as '{\"kind\": \"llvm\"}'")
    raise unknown_choice("target preset", text, presets)


def _raw_preset(spec: dict | str, label: str) -> TargetPreset:
    from .tvm import target as tvm_target

    target = tvm_target.make_target(spec)  # validates; raises UserError on rejection
    host = getattr(target, "host", None)
    triple = str(host.attrs.get("mtriple", "")) if host is not None else ""
    triple = triple or str(target.attrs.get("mtriple", "")) or "native"
    kind = target.kind.name
    device = "cpu" if kind == "llvm" else kind
    arch = triple.split("-")[0] if triple != "native" else this_arch()
    runnable = "here" if device == "cpu" and arch == this_arch() else "board"
    return TargetPreset(name=label, description="raw TVM target", tvm_target=spec,
                        host_triple=triple, device=device, runnable=runnable)

"""make_online_tsm: a plain 2D CNN (no shift) becomes an online TSM, and --model-file.

The models here are written in the shape of the families users ask for (basic-block and
bottleneck ResNets, MobileNetV2/V3, EfficientNet-B0, RegNetY), tiny (32 px, 4-64 channels) so each
compiles in seconds. Each is converted, compiled for this host, streamed, and checked frame by
frame against both PyTorch references of ``verify`` (the eager loop of the converted model and
the offline clip model with the uni-directional shift).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tsm_edge.errors import UserError
from tsm_edge.models.insert import TRACER, fold_div_from_fraction, make_online_tsm
from tsm_edge.models.registry import build_model, randomize_
from tsm_edge.models.shift import TemporalShift, shift_modules

from helpers import RESNET_LIKE_FILE, eager_stream, run_cli

SIZE = 32


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class Head(nn.Module):
    def __init__(self, cin, classes=5):
        super().__init__()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------- ResNet-18/34


class BasicBlock(nn.Module):
    """torchvision's BasicBlock; ``shift`` puts a TemporalShift in by hand (the reference)."""

    def __init__(self, cin, cout, stride=1, shift=None, fold_div=8):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)
        self.place = shift
        self.shift = TemporalShift(fold_div) if shift else None

    def forward(self, x):
        if self.place == "inplace":
            x = self.shift(x)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.shift(x) if self.place == "residual" else x
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, shift=None, fold_div=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1, shift, fold_div))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2, shift, fold_div),
                                    BasicBlock(32, 32, 1, shift, fold_div))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Bottleneck(8, 4))
        self.layer2 = nn.Sequential(Bottleneck(16, 8, 2), Bottleneck(32, 8))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------- MobileNetV2/V3


class SqueezeExcite(nn.Module):
    def __init__(self, c, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(c // 4, 4), 1)
        self.act = act()
        self.fc2 = nn.Conv2d(max(c // 4, 4), c, 1)
        self.gate = gate()

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2's block (ReLU6) or, with ``se``, MobileNetV3's (hard-swish, SE)."""

    def __init__(self, cin, cout, stride, expand, se=False):
        super().__init__()
        act = nn.Hardswish if se else nn.ReLU6
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=act)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act)]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res_connect else out


class MobileNetV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2, act=nn.Hardswish),
            InvertedResidual(8, 8, 1, 1),             # V2, residual
            InvertedResidual(8, 16, 2, 4),            # stride 2: no shortcut
            InvertedResidual(16, 16, 1, 3, se=True),  # V3: SE + hard-swish
            InvertedResidual(16, 16, 1, 3, se=True),
            conv_bn(16, 32, 1, act=nn.Hardswish))
        self.head = Head(32)

    def forward(self, x):
        return self.head(self.features(x))


# --------------------------------------------------------------------------- EfficientNet-B0


class StochasticDepth(nn.Module):
    """torchvision's: identity in eval mode (Python control flow on a flag, which fx traces)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) >= self.p
        return x * keep / (1 - self.p)


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.SiLU)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcite(hidden, act=nn.SiLU, gate=nn.Sigmoid),
                   conv_bn(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout
        self.stochastic_depth = StochasticDepth(0.2)

    def forward(self, x):
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNetB0(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.SiLU),
            nn.Sequential(MBConv(16, 8, 3, 1, 1)),
            nn.Sequential(MBConv(8, 16, 3, 2, 6), MBConv(16, 16, 5, 1, 6)),
            conv_bn(16, 32, 1, act=nn.SiLU))
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(32, 5)

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.classifier(self.dropout(x))


# --------------------------------------------------------------------------- RegNetY


class YBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width=8):
        super().__init__()
        self.a = conv_bn(cin, cout, 1)
        self.b = conv_bn(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcite(cout, gate=nn.Sigmoid)
        self.c = conv_bn(cout, cout, 1, act=None)
        self.proj = (conv_bn(cin, cout, 1, stride, act=None)
                     if stride != 1 or cin != cout else None)
        self.activation = nn.ReLU()

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.c(self.se(self.b(self.a(x)))))


class RegNetY(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.trunk_output = nn.Sequential(
            nn.Sequential(YBlock(16, 24, 2), YBlock(24, 24, 1)),
            nn.Sequential(YBlock(24, 48, 2), YBlock(48, 48, 1)))
        self.fc = nn.Linear(48, 5)

    def forward(self, x):
        return self.fc(self.trunk_output(self.stem(x)).mean((2, 3)))


# name -> (model, {block: shortcut} shifted, {block: reason fragment} left alone)
ARCHS = {
    "resnet18": (ResNet18, {"layer1.0": "identity", "layer2.0": "projection",
                            "layer2.1": "identity"}, {}),
    "resnet50": (ResNet50, {"layer1.0": "projection", "layer2.0": "projection",
                            "layer2.1": "identity"}, {}),
    "mobilenetv3": (MobileNetV3, {"features.1": "identity", "features.3": "identity",
                                  "features.4": "identity"},
                    {"features.0": "no shortcut", "features.2": "no shortcut",
                     "features.5": "no shortcut"}),
    "efficientnet_b0": (EfficientNetB0, {"features.2.1": "identity"},
                        {"features.2.0": "no shortcut"}),
    "regnety": (RegNetY, {"trunk_output.0.0": "projection", "trunk_output.0.1": "identity",
                          "trunk_output.1.0": "projection", "trunk_output.1.1": "identity"},
                {}),
}


def plain(arch: str, seed: int = 0) -> nn.Module:
    model = ARCHS[arch][0]()
    randomize_(model, seed)
    return model.eval()


def frames(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_blocks_are_found_by_the_graph_and_shifted_at_the_branch_start(arch):
    model = plain(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    online = make_online_tsm(model, input_size=SIZE)
    report = online.tsm_report
    _, shifted, left = ARCHS[arch]
    assert report.tracer == TRACER == "torch.fx.symbolic_trace"
    assert {b.name: b.shortcut for b in report.shifted} == shifted
    assert {b.name for b in report.skipped} == set(left)
    for b in report.skipped:
        assert left[b.name] in b.reason and b.shortcut == "none"
    assert [n for n, _ in shift_modules(online)] == [b.shift for b in report.shifted]
    assert all(b.shift == f"{b.name}.shift" and b.cache_channels == (0, b.channels // 8)
               for b in report.shifted)
    # residual: each shift feeds the branch only; the shortcut reads the unshifted input
    for node in online.graph.nodes:
        if node.op == "call_module" and isinstance(online.get_submodule(node.target),
                                                   TemporalShift):
            (x,) = node.args
            assert not any("downsample" in u.name or "proj" in u.name
                           or u.name.startswith("add") for u in node.users)
            assert [u for u in x.users if u is not node]  # the shortcut's, unshifted
    # the input model is not changed and the weights keep their names
    assert not shift_modules(model)
    assert set(online.state_dict()) == set(before)
    assert all(torch.equal(online.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_converted_model_compiles_streams_and_verifies(arch, tmp_path):
    from tsm_edge.artifact.store import read_manifest
    from tsm_edge.compiler.api import compile_module
    from tsm_edge.compiler.targets import resolve_target
    from tsm_edge.measure.verify import verify
    from tsm_edge.models.resolve import ModelSource

    online = make_online_tsm(plain(arch, seed=1), input_size=SIZE)
    report = online.tsm_report
    source = ModelSource(name=arch, num_classes=5, input_size=SIZE, module=online,
                         shift=report.to_json())
    art = compile_module(source, tmp_path / arch, preset=resolve_target("host"), tuning="none")
    m = read_manifest(art)
    assert [c.name for c in m.caches] == [b.shift for b in report.shifted]
    for c, b in zip(m.caches, report.shifted):
        assert c.channels == (0, b.channels // 8) and c.shape[1] == b.channels // 8
    assert m.model.shift["place"] == "residual" and m.model.shift["fold_div"] == 8
    result = verify(art, model=online, frames=5)
    assert result["passed"], result
    assert result["relative_vs_eager"] < 1e-4 and result["relative_vs_offline"] < 1e-4
    # the caches carry: a stream differs from the same frames run each with zero caches
    fr = frames(3, seed=2)
    streamed = eager_stream(online, fr)
    fresh = np.stack([eager_stream(online, fr[i:i + 1])[0] for i in range(3)])
    assert np.abs(streamed[1:] - fresh[1:]).max() > 1e-3


@pytest.mark.parametrize("place,fold_div", [("residual", 8), ("inplace", 8), ("inplace", 4),
                                            ("residual", 1)])
def test_same_outputs_as_the_shift_put_in_by_hand(place, fold_div):
    by_hand = ResNet18(shift=place, fold_div=fold_div)
    randomize_(by_hand, 3)
    by_hand.eval()
    online = make_online_tsm(plain("resnet18", seed=9), place=place, fold_div=fold_div,
                             input_size=SIZE)
    online.load_state_dict(by_hand.state_dict())
    assert [n for n, _ in shift_modules(online)] == [n for n, _ in shift_modules(by_hand)]
    fr = frames(4)
    np.testing.assert_array_equal(eager_stream(online, fr), eager_stream(by_hand, fr))
    other = "inplace" if place == "residual" else "residual"
    wrong = make_online_tsm(plain("resnet18"), place=other, fold_div=fold_div, input_size=SIZE)
    wrong.load_state_dict(by_hand.state_dict())
    assert np.abs(eager_stream(wrong, fr) - eager_stream(by_hand, fr)).max() > 1e-4


@pytest.mark.parametrize("name,blocks", [("tsm_mobilenetv2", 10), ("tsm_resnet50", 16)])
def test_registered_backbones_come_out_the_same(name, blocks):
    registered = build_model(name, seed=4)
    online = make_online_tsm(build_model(name, seed=4, shift=False), input_size=64)
    online.load_state_dict(registered.state_dict())
    assert len(online.tsm_report.shifted) == blocks
    assert [n for n, _ in shift_modules(online)] == [n for n, _ in shift_modules(registered)]
    fr = frames(3, size=64)
    np.testing.assert_allclose(eager_stream(online, fr), eager_stream(registered, fr),
                               rtol=0, atol=1e-5)
    assert all(b.cache_channels == (0, b.channels // 8) for b in online.tsm_report.shifted)


def test_too_few_channels_for_the_fold_are_left_and_reported():
    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 4, 3, 2)
            self.narrow = BasicBlock(4, 4)
            self.wide = nn.Sequential(BasicBlock(4, 16, 2), BasicBlock(16, 16))
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(self.wide(self.narrow(self.stem(x))).mean((2, 3)))

    online = make_online_tsm(Narrow().eval(), input_size=SIZE)
    report = online.tsm_report
    assert [b.name for b in report.shifted] == ["wide.1"]
    skipped = {b.name: b.reason for b in report.skipped}
    assert set(skipped) == {"stem", "narrow", "wide.0"}
    assert "no shortcut" in skipped.pop("stem")
    assert all("too few channels for the fold: 4 channels // fold_div 8" in r
               for r in skipped.values())
    assert "1 of 4 blocks shifted" in report.summary()
    # at 1/4 the 4-channel blocks get one channel each
    assert len(make_online_tsm(Narrow().eval(), fold_div=4, input_size=SIZE)
               .tsm_report.shifted) == 3


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            return x + self.conv(x)
        return x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.blocks = nn.Sequential(BasicBlock(8, 8), Gate())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_untraceable_model_is_one_line_naming_the_module():
    with pytest.raises(UserError) as err:
        make_online_tsm(Branchy().eval(), input_size=SIZE)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("torch.fx.symbolic_trace cannot trace blocks.1 (Gate)")
    assert "data-dependent control flow" in message


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="already has TemporalShift at layer1.0.shift"):
        make_online_tsm(ResNet18(shift="residual"))
    with pytest.raises(UserError, match="--shift-place middle is not valid; valid: residual, "
                                        "inplace"):
        make_online_tsm(plain("resnet18"), place="middle")
    with pytest.raises(UserError, match="found no residual block"):
        make_online_tsm(nn.Sequential(conv_bn(3, 8), nn.Flatten()).eval(), input_size=SIZE)
    assert [fold_div_from_fraction(f) for f in ("1/8", "1/4", "0.5", "1")] == [8, 4, 2, 1]
    for bad in ("3/8", "0", "2", "a quarter"):
        with pytest.raises(UserError, match=f"--shift-fraction {bad} is not valid"):
            fold_div_from_fraction(bad)


# --------------------------------------------------------------------------- checkpoints

MODEL_FILE = RESNET_LIKE_FILE


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_net.py"
    path.write_text(MODEL_FILE)
    return path


def _official_keys(state: dict, shifted: list[str]) -> dict:
    """The official training code's names: module.base_model.*, the shifted conv1 wrapped
    (``.conv1.net.``, blockres), the head module.new_fc.*."""
    out = {}
    for k, v in state.items():
        for block in shifted:
            k = k.replace(f"{block}.conv1.", f"{block}.conv1.net.")
        out[k.replace("fc.", "module.new_fc.", 1) if k.startswith("fc.")
            else f"module.base_model.{k}"] = v
    return out


def _mmaction2_keys(state: dict) -> dict:
    import re

    out = {}
    for k, v in state.items():
        if k.startswith("fc."):
            out[f"cls_head.fc_cls.{k[3:]}"] = v
            continue
        k = re.sub(r"^conv1\.", "conv1.conv.", k)
        k = re.sub(r"^bn1\.", "conv1.bn.", k)
        k = re.sub(r"\.conv(\d)\.", r".conv\1.conv.", k)
        k = re.sub(r"\.bn(\d)\.", r".conv\1.bn.", k)
        k = k.replace(".downsample.0.", ".downsample.conv.").replace(".downsample.1.",
                                                                     ".downsample.bn.")
        out[f"backbone.{k}"] = v
    return out


@pytest.mark.parametrize("layout", ["official-offline", "mmaction2"])
def test_checkpoint_trained_with_the_same_insertion_loads(layout, model_file, tmp_path):
    from tsm_edge.models.resolve import resolve_model_file

    spec = f"{model_file}:build"
    trained = resolve_model_file(spec, input_size=SIZE, seed=5).module
    randomize_(trained, 11)  # "trained" weights, not the function's
    shifted = [b.name for b in trained.tsm_report.shifted]
    state = trained.state_dict()
    keys = _official_keys(state, shifted) if layout == "official-offline" else \
        _mmaction2_keys(state)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "arch": "my_net", "state_dict": keys}, path)
    src = resolve_model_file(spec, input_size=SIZE, checkpoint=str(path),
                             cache_channels="first")
    assert src.checkpoint_layout == layout and src.trained_shift == "bidirectional"
    loaded = src.module.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    entry = src.manifest_entry()
    assert entry["checkpoint"]["layout"] == layout and entry["num_classes"] == 6


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow  # compile and verify in subprocesses
def test_model_file_cli_end_to_end(model_file, tmp_path):
    out = tmp_path / "art"
    proc = run_cli("compile", "--model-file", f"{model_file}:build", "--input-size", str(SIZE),
                   "--shift-fraction", "1/4", "--shift-place", "inplace", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "shifts     2 of 2 blocks (inplace, fraction 1/4" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    model = manifest["model"]
    assert model["name"] == "my_net:build" and model["num_classes"] == 6
    assert model["model_file"]["function"] == "build" and len(model["model_file"]["sha256"]) == 64
    assert model["shift"]["place"] == "inplace" and model["shift"]["fold_div"] == 4
    assert [c["name"] for c in manifest["caches"]] == ["layer1.0.shift", "layer1.1.shift"]
    assert [c["channels"] for c in manifest["caches"]] == [[0, 4], [0, 4]]
    # verify rebuilds the PyTorch model from the manifest: the file re-imported, hashes checked
    proc = run_cli("verify", str(out), "--frames", "4")
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout + proc.stderr
    # a changed model file is refused, not silently compared
    from tsm_edge.artifact.store import read_manifest
    from tsm_edge.models.resolve import model_from_manifest

    model_file.write_text(MODEL_FILE.replace("Block(16, 32, 2)", "Block(16, 32, 1)"))
    with pytest.raises(UserError, match="has changed since the artifact was compiled"):
        model_from_manifest(read_manifest(out))


def _cli(capsys, *args) -> str:
    """The CLI in this process (its error path is the same ``main``); returns stderr."""
    from tsm_edge.cli import main

    assert main(list(args)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_model_file_cli_errors(model_file, tmp_path, capsys):
    out = str(tmp_path / "art")
    line = _cli(capsys, "compile", "--model-file", f"{model_file}:biuld", "-o", out)
    assert "'biuld'" in line and "did you mean 'build'" in line
    assert "valid: build, untraceable" in line
    line = _cli(capsys, "compile", "--model-file", f"{model_file}:untraceable", "--input-size",
                str(SIZE), "-o", out)
    assert "torch.fx.symbolic_trace cannot trace layer1.0.relu (Gate)" in line
    line = _cli(capsys, "compile", "--model-file", str(model_file), "-o", out)
    assert str(model_file) in line and "valid: FILE.py:FUNCTION" in line
    line = _cli(capsys, "compile", "--model-file", f"{tmp_path / 'none.py'}:build", "-o", out)
    assert "none.py does not exist" in line
    line = _cli(capsys, "compile", "--model-file", f"{model_file}:build", "--shift-place", "mid",
                "-o", out)
    assert "--shift-place mid is not valid; valid: residual, inplace" in line
    line = _cli(capsys, "compile", "--model", "tsm_resnet50_tiny", "--model-file",
                f"{model_file}:build", "-o", out)
    assert "not both" in line
    assert not (tmp_path / "art").exists()


@pytest.mark.slow  # compiles a model
def test_winograd_convolutions_in_a_whole_model_match_pytorch(model_file, tmp_path,
                                                               monkeypatch):
    """At 64 px the model's three stride-1 3x3 convolutions (16 channels at 32x32, 32 at
    16x16) take the Winograd form, the residual add and ReLU fused into the output transform;
    the artifact matches both PyTorch references, and the direct form gives the same logits."""
    import tsm_edge
    from tsm_edge.compiler.tvm.conv import WINOGRAD_VAR
    from tsm_edge.measure.verify import verify
    from tsm_edge.runtime.session import StreamSession

    from helpers import TINY_SIZE

    spec = f"{model_file}:build"
    art = tsm_edge.compile(None, tmp_path / "wino", model_file=spec, input_size=TINY_SIZE)
    info = json.loads((art / "manifest.json").read_text())["tuning"]["default_schedules"]
    assert info["winograd_convolutions"] == 3
    forms = [op.get("form") for op in info["operators"].values()]
    assert forms.count("winograd product") >= 2 and "winograd output" in forms
    fused = [name for name, op in info["operators"].items()
             if op.get("form") == "winograd output" and "add" in name and "relu" in name]
    assert fused, "the epilogue did not fuse into the output transform"
    report = verify(art, frames=6)
    assert report["passed"], report
    monkeypatch.setenv(WINOGRAD_VAR, "0")
    direct = tsm_edge.compile(None, tmp_path / "direct", model_file=spec, input_size=TINY_SIZE)
    assert json.loads((direct / "manifest.json").read_text())["tuning"]["default_schedules"][
        "winograd_convolutions"] == 0
    frames = np.random.default_rng(1).standard_normal((4, 1, 3, TINY_SIZE, TINY_SIZE),
                                                      ).astype(np.float32)
    a, b = StreamSession(art), StreamSession(direct)
    for f in frames:
        la, lb = a.step(f), b.step(f)
        np.testing.assert_allclose(la, lb, rtol=0, atol=1e-4 * np.abs(lb).max())

"""Bad configuration input: typed ``--set`` values and config-file values, unsafe or broken YAML/JSON
config files, and malformed arch files. Every error is a ValueError naming the key or the file."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fasterkd.models.arch import ArchSpec
from fasterkd.overrides import coerce_override, field_types, parse_set, read_config_file
from fasterkd.train import DataConfig, LossConfig, OptimConfig, SearchConfig, TrainConfig

T = {**{f"data.{k}": v for k, v in field_types(DataConfig).items()},
     **{f"optim.{k}": v for k, v in field_types(OptimConfig).items()},
     **{f"loss.{k}": v for k, v in field_types(LossConfig).items()},
     **{f"search.{k}": v for k, v in field_types(SearchConfig).items()},
     **{k: v for k, v in field_types(TrainConfig).items()}}

# (key, raw value as typed on the command line or read from a file, expected value)
GOOD = [
    ("loss.ohem", "False", False), ("loss.ohem", "false", False), ("loss.ohem", "TRUE", True),
    ("loss.ohem", "yes", True), ("loss.ohem", "No", False), ("loss.ohem", "0", False), ("loss.ohem", "1", True),
    ("loss.ohem", "off", False), ("loss.ohem", False, False), ("loss.ohem", 1, True),
    ("epochs", "3", 3), ("epochs", " 12 ", 12), ("epochs", 4, 4), ("epochs", 4.0, 4),
    ("optim.lr", "0.005", 0.005), ("optim.lr", "1e-3", 0.001), ("optim.lr", 1, 1.0),
    ("optim.grad_clip", "none", None), ("optim.grad_clip", "null", None), ("optim.grad_clip", "5", 5.0),
    ("optim.grad_clip", None, None),
    ("data.crop", "256x512", (256, 512)), ("data.crop", "256X512", (256, 512)), ("data.crop", "[256, 512]", (256, 512)),
    ("data.crop", "(64,128)", (64, 128)), ("data.crop", "64,128", (64, 128)), ("data.crop", [64, 128], (64, 128)),
    ("data.scales", "0.75,1,1.25", (0.75, 1.0, 1.25)), ("data.scales", "[1.0]", (1.0,)), ("data.scales", 1.0, (1.0,)),
    ("data.max_train_images", "none", None), ("data.max_train_images", "8", 8),
    ("search.lasts", "[[2, 0], [2, 1]]", ((2, 0), (2, 1))), ("search.lasts", [[2]], ((2,),)),
    ("search.fps_min", "None", None), ("search.supernet", '{"layers": 4}', {"layers": 4}),
    ("data.root", "", ""), ("data.root", "data/cityscapes", "data/cityscapes"), ("device", "cuda:1", "cuda:1"),
    ("data.root", Path("data/cs"), "data/cs"),
]

# (key, raw, words the error must hold besides the key)
BAD = [
    ("loss.ohem", "Flase", "a boolean"), ("loss.ohem", "2", "a boolean"), ("loss.ohem", 2, "a boolean"),
    ("loss.ohem", "", "a boolean"), ("loss.ohem", [True], "a boolean"),
    ("optim.lr", "abc", "a finite number"), ("optim.lr", "nan", "NaN and infinity"), ("optim.lr", "inf", "NaN"),
    ("optim.lr", True, "a finite number"), ("optim.lr", [0.1], "a finite number"),
    ("epochs", "x", "an integer"), ("epochs", [1], "an integer"), ("epochs", "[1]", "an integer"),
    ("epochs", "1.5", "an integer"), ("epochs", 1.5, "an integer"), ("epochs", True, "an integer"),
    ("epochs", None, "an integer"), ("epochs", {"n": 1}, "an integer"),
    ("data.crop", "256", "1 value(s) given"), ("data.crop", "256x512x3", "2 integers"),
    ("data.crop", "axb", "2 integers"), ("data.crop", [256, "x"], "item 1"), ("data.crop", [256, 512.5], "item 1"),
    ("data.crop", 256, "2 integers"), ("data.scales", "1,a", "item 1"),
    ("optim.grad_clip", "abc", "a finite number or none"), ("data.max_train_images", "-", "an integer or none"),
    ("search.lasts", "[[2, 0], [2, 'a']]", "a list"), ("search.supernet", "[1]", "a mapping"),
    ("search.supernet", "{bad", "write it as JSON"), ("device", 0, "a string"), ("data.root", None, "a string"),
]


@pytest.mark.parametrize("key,raw,expected", GOOD, ids=[f"{k}={r!r}" for k, r, _ in GOOD])
def test_coerce_override_parses_to_the_fields_type(key, raw, expected):
    value = coerce_override(key, raw, T[key])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("key,raw,words", BAD, ids=[f"{k}={r!r}" for k, r, _ in BAD])
def test_coerce_override_refuses_naming_key_and_type(key, raw, words):
    with pytest.raises(ValueError) as info:
        coerce_override(key, raw, T[key])
    msg = str(info.value)
    assert msg.startswith(f"{key}: expected ") and words in msg and repr(raw) in msg


@pytest.mark.parametrize("default,raw,expected", [(True, "no", False), (3, "7", 7), (0.5, "2", 2.0), ("a", "b", "b"),
                                                  ((1, 2), "3x4", (3, 4)), (None, "[1, 2]", [1, 2]), (None, "x", "x")])
def test_a_default_value_stands_for_its_type(default, raw, expected):
    assert coerce_override("k", raw, default) == expected


@pytest.mark.parametrize("default,raw", [(True, "maybe"), (3, "3.5"), (0.5, "half"), ((1, 2), "a,b")])
def test_a_default_value_refuses_like_its_type(default, raw):
    with pytest.raises(ValueError, match="^k: expected"):
        coerce_override("k", raw, default)


@pytest.mark.parametrize("item,expected", [("loss.ohem=False", ("loss.ohem", "False")), ("lr=a=b", ("lr", "a=b")),
                                           (" epochs =2", ("epochs", "2"))])
def test_parse_set(item, expected):
    assert parse_set(item) == expected


@pytest.mark.parametrize("item", ["loss.ohem", "=3", "a..b=1", "1x=2", "a b=1"])
def test_parse_set_refuses(item):
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        parse_set(item)


# ---------------------------------------------------------------------------- config files

CONFIG_FILES = [
    ("python-tag.yaml", "epochs: !!python/object/apply:os.system ['touch {marker}']\n", "line 1:.*no !!python tags"),
    ("python-name.yml", "x: !!python/name:os.system\n", "no !!python tags"),
    ("bad-indent.yaml", "epochs: 2\n  lr: [0.1\n", "not valid YAML"),
    ("tab.yaml", "epochs:\t2\n\tlr: 1\n", "not valid YAML"),
    ("list.yaml", "- epochs\n- 2\n", "expected a mapping of option names to values, got list"),
    ("scalar.yaml", "3\n", "got int"),
    ("int-key.yaml", "1: 2\n", "option names must be strings"),
    ("bad.json", '{"epochs": 2,}', "not valid JSON \\(line 1 column 14"),
    ("list.json", "[1, 2]", "got list"),
    ("binary.json", b"\x89PNG\r\n\x1a\n\xff\xfe", "not a UTF-8 text file"),
]


@pytest.mark.parametrize("name,content,words", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_config_files_refused_naming_the_file(tmp_path, name, content, words):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("{marker}", str(marker)))
    with pytest.raises(ValueError, match=rf"^config {path}:.*{words}"):
        read_config_file(path)
    assert not marker.exists()


def test_config_file_good_empty_missing_and_folder(tmp_path):
    (tmp_path / "a.yaml").write_text("epochs: 2\nloss.ohem: false\ncrop: 64x128\n")
    assert read_config_file(tmp_path / "a.yaml") == {"epochs": 2, "loss.ohem": False, "crop": "64x128"}
    (tmp_path / "e.yaml").write_text("# nothing\n")
    assert read_config_file(tmp_path / "e.yaml") == {}
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        read_config_file(tmp_path / "nope.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ValueError, match="dir.yaml' is not a file"):
        read_config_file(tmp_path / "dir.yaml")


def test_a_config_file_value_is_checked_like_a_set_value(tmp_path):
    (tmp_path / "c.json").write_text('{"epochs": "x", "loss.ohem": "False"}')
    opts = read_config_file(tmp_path / "c.json")
    assert coerce_override("loss.ohem", opts["loss.ohem"], T["loss.ohem"]) is False
    with pytest.raises(ValueError, match="^epochs: expected an integer, got 'x'$"):
        coerce_override("epochs", opts["epochs"], T["epochs"])


# ---------------------------------------------------------------------------- arch files

ARCH = json.loads((Path(__file__).resolve().parents[1] / "fasterkd/models/archs/fasterseg_student.json").read_text())


def _set(d: dict, path: tuple, value: Any) -> dict:
    d = copy.deepcopy(d)
    target = d
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return d


# (case id, arch JSON value, words naming the field)
ARCH_CASES = [
    ("fch-zero", _set(ARCH, ("fch",), 0), "fch must be >= 1, got 0"),
    ("fch-negative", _set(ARCH, ("fch",), -12), "fch must be >= 1"),
    ("fch-string", _set(ARCH, ("fch",), "12"), "fch must be an integer, got '12'"),
    ("stem-float", _set(ARCH, ("stem_chi",), 4.5), "stem_chi must be an integer, got 4.5"),
    ("head-bool", _set(ARCH, ("head_chi",), True), "head_chi must be an integer, got True"),
    ("head-zero", _set(ARCH, ("head_chi",), 0), "head_chi must be >= 1"),
    ("chi-string", _set(ARCH, ("branches", 0, "chis", 2), "4"), r"chis\[2\] must be an integer, got '4'"),
    ("chi-float", _set(ARCH, ("branches", 0, "chis", 2), 4.5), r"chis\[2\] must be an integer, got 4.5"),
    ("chi-integral-float", _set(ARCH, ("branches", 1, "chis", 0), 4.0), r"chis\[0\] must be an integer, got 4.0"),
    ("chi-zero", _set(ARCH, ("branches", 0, "chis", 1), 0), r"chis\[1\] must be >= 1, got 0"),
    ("chi-null", _set(ARCH, ("branches", 0, "chis", 1), None), r"chis\[1\] must be an integer"),
    ("chis-not-list", _set(ARCH, ("branches", 0, "chis"), 4), "chis must be a list of integers"),
    ("down-two", _set(ARCH, ("branches", 0, "downs", 0), 2), r"downs\[0\] must be in 0..1, got 2"),
    ("path-string", _set(ARCH, ("branches", 0, "path", 0), "0"), r"path\[0\] must be an integer, got '0'"),
    ("last-five", _set(ARCH, ("branches", 0, "last"), 5), "last must be 0, 1 or 2"),
    ("ops-string", _set(ARCH, ("branches", 0, "ops"), "conv"), "ops must be a non-empty list"),
    ("branch-list", _set(ARCH, ("branches", 0), [2, "conv"]), r"branches\[0\] must be an object"),
    ("branch-extra-key", _set(ARCH, ("branches", 0, "extra"), 1), r"branches\[0\] must be an object with keys"),
    ("branches-null", _set(ARCH, ("branches",), None), "branches must be a list, got NoneType"),
    ("name-number", _set(ARCH, ("name",), 3), "name must be a string"),
    ("source-list", _set(ARCH, ("source",), [1]), "source must be a mapping"),
    ("file-list", [ARCH], "expected a JSON object \\(a fasterkd arch\\), got list"),
    ("file-null", None, "expected a JSON object \\(a fasterkd arch\\), got NoneType"),
    ("file-number", 12, "got int"),
    ("file-string", "arch", "got str"),
]


@pytest.mark.parametrize("case,value,words", ARCH_CASES, ids=[c[0] for c in ARCH_CASES])
def test_arch_files_refused_naming_file_and_field(tmp_path, case, value, words):
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(value))
    with pytest.raises(ValueError, match=rf"^{path}: .*{words}"):
        ArchSpec.load(path)


def test_the_official_arch_still_loads_and_round_trips(tmp_path):
    spec = ArchSpec.from_dict(ARCH)
    spec.save(tmp_path / "a.json")
    assert ArchSpec.load(tmp_path / "a.json").to_dict() == spec.to_dict()
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.json: not valid JSON"):
        ArchSpec.load(tmp_path / "bin.json")

"""Config loading: schemas, every shipped config, broken configs reported with JSON paths, defaults."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from maisi.config import (
    ConfigError,
    EncodeConfig,
    EvaluateConfig,
    InferConfig,
    TrainConfig,
    load_config,
    load_schema,
    to_jsonable,
)
from maisi.config.schema import _strip_optional
from maisi.families.checks import load_checked_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_KINDS = {
    "inference": "infer",
    "encode": "encode",
    "train": "train",
    "evaluate": "evaluate",
}  # file-name prefix -> config kind


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    if path.name == "label_dict.json":
        from maisi.labels import load_label_dict

        assert load_label_dict(path) == load_label_dict()  # the packaged copy and this one agree
        return
    kind = next((k for prefix, k in CONFIG_KINDS.items() if path.name.startswith(prefix)), None)
    assert kind is not None, f"{path.name}: unknown kind of config; add its prefix to CONFIG_KINDS"
    load_checked_config(path, kind)


def _object_schemas(schema: dict, where: str = "$"):
    if isinstance(schema.get("items"), dict):
        yield from _object_schemas(schema["items"], f"{where}[*]")
    t = schema.get("type")
    if t == "object" or (isinstance(t, list) and "object" in t):
        yield where, schema
        for key, sub in schema.get("properties", {}).items():
            yield from _object_schemas(sub, f"{where}.{key}")


@pytest.mark.parametrize("kind", ["infer", "encode", "datalist", "train", "evaluate"])
def test_schema_rejects_unknown_keys_everywhere_and_describes_every_property(kind):
    schema = load_schema(kind)
    for where, obj in _object_schemas(schema):
        assert obj.get("additionalProperties") is False, where
        for key, sub in obj.get("properties", {}).items():
            assert sub.get("description"), f"{where}.{key} has no description"


def _dataclass_fields_match(cls, schema: dict, where: str = "$"):
    props = schema["properties"]
    hints = typing.get_type_hints(cls)
    assert {f.name for f in dataclasses.fields(cls)} == set(props), where
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            _dataclass_fields_match(tp, props[f.name], f"{where}.{f.name}")


@pytest.mark.parametrize(
    "cls, kind",
    [(InferConfig, "infer"), (EncodeConfig, "encode"), (TrainConfig, "train"), (EvaluateConfig, "evaluate")],
)
def test_dataclasses_mirror_the_schema(cls, kind):
    _dataclass_fields_match(cls, load_schema(kind))


def _minimal(tmp_path: Path) -> dict:
    return {
        "preset": "tiny-rflow",
        "checkpoints": {"autoencoder": "a.pt", "diffusion_unet": "u.pt"},
        "output_size": [32, 32, 16],
        "spacing": [1.0, 1.0, 2.0],
    }


def _load(tmp_path: Path, data) -> InferConfig:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return load_checked_config(path, "infer")


def test_defaults_are_filled_and_paths_resolved_against_the_config_folder(tmp_path):
    config = _load(tmp_path, _minimal(tmp_path))
    assert config.checkpoints.autoencoder == str(tmp_path / "a.pt")
    assert config.checkpoints.controlnet is None
    assert config.output.dir == str(tmp_path / "output")
    assert config.sampling.conditioning_scale == 1.0
    assert config.sampler == "rflow" and config.num_inference_steps == 30
    assert config.decoding.sw_roi_size == (48, 48, 48)
    assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen
    # the resolved config is plain JSON again
    assert json.loads(json.dumps(to_jsonable(config)))["output"]["format"] == "nii.gz"


BROKEN = [
    ("misspelled key", {"seeed": 3}, ["$.seeed: unknown key 'seeed'; did you mean 'seed'?"]),
    ("nested unknown key", {"sampling": {"steps": 3}}, ["$.sampling.steps: unknown key 'steps'"]),
    ("wrong type", {"seed": "abc"}, ['$.seed: got "abc", expected type integer']),
    ("bad enum", {"device": "gpu"}, ['$.device: got "gpu", expected one of']),
    ("out of range", {"sampling": {"num_inference_steps": 0}}, ["$.sampling.num_inference_steps"]),
    ("size not a triple", {"output_size": [32, 32]}, ["$.output_size"]),
    ("negative spacing", {"spacing": [1.0, -1.0, 2.0]}, ["$.spacing[1]"]),
    ("bad region", {"body_region": {"top": "neck", "bottom": "chest"}}, ["$.body_region.top"]),
    (
        "missing required",
        {"checkpoints": {"autoencoder": "a.pt"}},
        ["$.checkpoints: 'diffusion_unet' is a required"],
    ),
    (
        "unknown preset",
        {"preset": "maisi-ct-rflw"},
        ["$.preset: unknown preset 'maisi-ct-rflw'. Did you mean 'maisi-ct-rflow'?"],
    ),
    (
        "mask and anatomy",
        {
            "mask": "m.nii.gz",
            "anatomy": {"anatomy_list": ["liver"]},
            "checkpoints": {"autoencoder": "a", "diffusion_unet": "u", "controlnet": "c"},
        },
        ["$.anatomy: cannot be combined with $.mask"],
    ),
    (
        "mask without controlnet",
        {"mask": "m.nii.gz", "output_size": None, "spacing": None},
        ["$.checkpoints.controlnet: required when generating from a mask"],
    ),
    (
        "size not multiple",
        {"output_size": [40, 32, 16]},
        ["$.output_size/$.spacing: size [40, 32, 16] is not a multiple of 16"],
    ),
    (
        "sampler mismatch",
        {"sampling": {"scheduler": "ddim"}},
        ["$.sampling: sampler 'ddim' cannot sample a rflow-trained UNet"],
    ),
    ("ddpm needs region", {"preset": "tiny-ddpm"}, ["$.body_region: required in image-only mode"]),
    (
        "released size",
        {"preset": "maisi-ct-rflow", "output_size": [256, 256, 96], "spacing": [1.5, 1.5, 2.0]},
        ["size z 96 is not one of"],
    ),
    (
        "released spacing",
        {"preset": "maisi-ct-rflow", "output_size": [256, 256, 128], "spacing": [3.5, 3.5, 2.0]},
        ["spacing x/y 3.5 mm is outside [0.5, 3] mm"],
    ),
    (
        "released fov",
        {"preset": "maisi-ct-rflow", "output_size": [256, 256, 128], "spacing": [0.8, 0.8, 2.0]},
        ["field of view in x/y 204.8 mm is under 256 mm"],
    ),
]


@pytest.mark.parametrize("changes, expected", [(c, e) for _, c, e in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_broken_config_fails_with_json_path(tmp_path, changes, expected):
    data = {**_minimal(tmp_path), **changes}
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, data)
    message = str(info.value)
    assert str(tmp_path / "cfg.json") in message
    for fragment in expected:
        assert fragment in message, message


def test_limits_can_be_relaxed_for_experiments(tmp_path):
    data = {
        **_minimal(tmp_path),
        "preset": "maisi-ct-rflow",
        "output_size": [64, 64, 64],
        "spacing": [1.0] * 3,
        "enforce_preset_limits": False,
    }
    assert _load(tmp_path, data).output_size == (64, 64, 64)


def test_all_errors_are_reported_at_once(tmp_path):
    data = {**_minimal(tmp_path), "seed": -1, "device": "tpu", "colour": "red", "output": {"format": "jpeg"}}
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, data)
    paths = [e.split(":")[0] for e in info.value.errors]
    assert paths == ["$.colour", "$.device", "$.output.format", "$.seed"]


@pytest.mark.parametrize(
    "text, fragment",
    [('{"preset": ', "not valid JSON"), ("[1, 2]", "$: got [1, 2], expected type object")],
)
def test_unparsable_or_non_object_config(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        _load(tmp_path, text)
    assert fragment in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.json", "infer")


# ------------------------------------------------------------ what Python's json accepts but JSON is not

SHIPPED = {
    "infer": "inference.json",
    "encode": "encode_sample_data.json",
    "evaluate": "evaluate_example.json",
    "train": "train_sample_data.json",
}
NOT_FINITE = "expected a finite number (JSON has no NaN or Infinity)"


@pytest.mark.parametrize(
    "literal, shown",
    [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"), ("1e999", "1e999")],
)
def test_non_finite_numbers_are_refused_with_their_json_path(tmp_path, literal, shown):
    """``"spacing": [NaN, ...]`` used to validate (NaN compares false to every bound) and fail deep inside."""
    data = {**_minimal(tmp_path), "sampling": {"conditioning_scale": "X"}, "decoding": {"sw_overlap": "X"}}
    data["spacing"] = [1.0, "X", 2.0]
    text = json.dumps(data).replace('"X"', literal)
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert info.value.errors == [
        f"$.spacing[1]: got {shown}, {NOT_FINITE}",
        f"$.sampling.conditioning_scale: got {shown}, {NOT_FINITE}",
        f"$.decoding.sw_overlap: got {shown}, {NOT_FINITE}",
    ]
    assert str(tmp_path / "cfg.json") in str(info.value)


@pytest.mark.parametrize("kind, shipped", sorted(SHIPPED.items()))
def test_every_config_kind_refuses_nan(tmp_path, kind, shipped):
    """One place (the loader) guards every kind: a NaN in a shipped config is refused before the schema."""
    data = json.loads((REPO / "configs" / shipped).read_text())
    data["seed"] = "__NAN__"
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(data).replace('"__NAN__"', "NaN"))
    with pytest.raises(ConfigError) as info:
        load_config(path, kind)
    assert info.value.errors == [f"$.seed: got NaN, {NOT_FINITE}"]


def test_a_string_spelled_nan_is_only_a_string(tmp_path):
    """Only the bare literal is refused: ``"NaN"`` in quotes is an ordinary (here: wrongly typed) string."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, {**_minimal(tmp_path), "seed": "NaN"})
    assert info.value.errors == ['$.seed: got "NaN", expected type integer']


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "cfg.json"
    text = json.dumps({**_minimal(tmp_path), "output": {"prefix": "é"}}, ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path, "infer")
    assert str(path) in str(info.value)
    assert info.value.errors == [
        f"not UTF-8 text (byte 0xe9 at offset {path.read_bytes().index(0xE9)}); save the file as UTF-8"
    ]


def test_utf8_with_bom_is_read(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({**_minimal(tmp_path), "mask": None}).encode())
    assert load_config(path, "infer").spacing == (1.0, 1.0, 2.0)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, expected a JSON file"):
        load_config(tmp_path, "infer")


def test_datalists_and_mappings_share_the_reader(tmp_path):
    """The datalist and label-mapping readers go through ``read_json``: NaN and non-UTF-8 are refused too."""
    from maisi.data.datalist import read_datalist
    from maisi.labels import load_label_dict
    from maisi.labels.mapping import load_mapping

    datalist = tmp_path / "datalist.json"
    datalist.write_text('{"training": [{"image": "a.nii.gz", "spacing": [1.0, NaN, 1.0]}]}')
    with pytest.raises(ConfigError, match=r"\$\.training\[0\]\.spacing\[1\]: got NaN"):
        read_datalist(datalist)
    mapping = tmp_path / "mapping.json"
    text = '{"mapping": [{"source_id": 1, "source_name": "f\xf6o", "target": "liver"}]}'
    mapping.write_bytes(text.encode("cp1252"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_mapping(str(mapping), load_label_dict())

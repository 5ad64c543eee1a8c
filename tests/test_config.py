"""Presets, inheritance and typed overrides."""

import pytest

from interclr_cli.config import all_keys, list_presets, load_config, load_preset_mapping, to_mapping
from interclr_cli.config.schema import Config
from interclr_cli.errors import UserError


def test_every_shipped_preset_resolves_and_has_a_description():
    presets = list_presets()
    assert {"quickstart", "mocov2-r50-imagenet", "mocov2-r18-cifar", "r50-imagenet", "r18-cifar"} <= set(presets)
    assert "_base" not in presets
    for name, desc in presets.items():
        assert desc, f"{name} has no description"
        cfg = load_config(name)
        assert isinstance(cfg, Config)


def test_inheritance_merges_sections_key_by_key():
    child = load_config("r18-cifar")
    parent = load_config("mocov2-r18-cifar")
    grand = load_config("mocov2-r50-imagenet")
    # set in the child
    assert child.method.name == "interclr" and child.method.inter.num_clusters == 500
    # inherited from the parent, untouched in the child
    assert child.model.small_stem is True and child.data.image_size == 32 == parent.data.image_size
    # inherited two levels up
    assert child.optim.momentum == grand.optim.momentum == 0.9
    assert grand.method.queue_size == 65536 and parent.method.queue_size == 4096


def test_inheritance_from_a_user_file(tmp_path):
    base = tmp_path / "mybase.yaml"
    base.write_text("base: r18-cifar\noptim:\n  lr: 0.5\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: mybase.yaml\ntrain:\n  epochs: 7\n")
    cfg = load_config(str(child))
    assert cfg.optim.lr == 0.5 and cfg.train.epochs == 7 and cfg.method.name == "interclr"
    assert cfg.name == "child"


def test_inheritance_cycle_is_an_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_preset_mapping(str(a))


def test_overrides_are_typed_from_the_schema():
    cfg = load_config(
        "r18-cifar",
        [
            "optim.lr=0.06",
            "train.epochs=3",
            "data.root=/data/cifar",
            "data.replacement=false",
            "optim.milestones=[60,80]",
            "data.mean=0.5,0.5,0.5",
            "method.inter.neg_sampling=hard",
        ],
    )
    assert cfg.optim.lr == 0.06 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.data.root == "/data/cifar"
    assert cfg.data.replacement is False
    assert cfg.optim.milestones == [60, 80]
    assert cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.method.inter.neg_sampling == "hard"


def test_int_override_accepts_integral_floats_and_underscores():
    cfg = load_config("r18-cifar", ["method.inter.pool_size=128_000", "train.batch_size=1e2"])
    assert cfg.method.inter.pool_size == 128000 and cfg.train.batch_size == 100


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=0.1", "did you mean 'optim.lr'"),
        ("trian.epochs=3", "did you mean 'train.epochs'"),
        ("optim.lr=fast", "optim.lr expects number, got 'fast'"),
        ("train.epochs=2.5", "train.epochs expects integer"),
        ("data.replacement=maybe", "data.replacement expects boolean"),
        ("optim=3", "unknown config key 'optim'"),
        ("noequals", "must look like key.sub=value"),
        ("method.inter.neg_sampling=hardest", "must be one of semihard, hard, random, semieasy"),
        ("device=gpu", "device must be auto, cpu, cuda or cuda:N"),
        ("train.batch_size=0", "train.batch_size must be positive"),
    ],
)
def test_override_errors_are_one_line_and_helpful(override, fragment):
    with pytest.raises(UserError) as e:
        load_config("r18-cifar", [override])
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg


def test_unknown_preset_suggests_nearest():
    with pytest.raises(UserError, match="did you mean 'r18-cifar'"):
        load_config("r18-cifr")


def test_unknown_key_in_a_preset_file_is_an_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown config key 'optim.learning_rate'"):
        load_config(str(p))


def test_bad_yaml_is_a_one_line_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim: [unclosed\n")
    with pytest.raises(UserError) as e:
        load_config(str(p))
    assert "not valid YAML" in str(e.value) and "\n" not in str(e.value)


def test_released_interclr_values():
    c = load_config("r50-imagenet")
    i = c.method.inter
    assert (c.model.arch, c.data.image_size, c.train.batch_size, c.optim.lr, c.train.epochs) == (
        "resnet50",
        224,
        256,
        0.03,
        200,
    )
    assert (i.num_clusters, i.pool_size, i.num_negatives, i.margin, i.temperature) == (10000, 128000, 16384, -0.5, 0.2)
    assert (c.method.intra.weight, i.weight, i.min_cluster_size, i.centroid_update_every, i.bank_momentum) == (
        0.75,
        0.25,
        20,
        10,
        1.0,
    )
    assert c.method.queue_size == 65536 and c.method.momentum == 0.999 and c.data.replacement is True


def test_all_keys_cover_the_schema_and_round_trip():
    keys = all_keys()
    assert "method.inter.neg_sampling" in keys and "optim.lr" in keys and "seed" in keys
    cfg = load_config("r18-cifar", ["optim.lr=0.7"])
    from interclr_cli.config import config_from_mapping

    assert config_from_mapping(to_mapping(cfg)) == cfg


# --- allowed values: declared once, as Literal types in the schema --------------------------------


def _schema_literals(cls=Config, prefix=""):
    """Every Literal-typed key of the schema -> its args, read straight from the dataclasses."""
    import dataclasses
    import typing

    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_schema_literals(tp, f"{prefix}{f.name}."))
        elif typing.get_origin(tp) is typing.Literal:
            out[prefix + f.name] = typing.get_args(tp)
    return out


SCHEMA_CHOICES = _schema_literals()


def test_fixed_value_keys_are_literals_in_the_schema():
    expected = {
        "data.source",
        "data.augment_on",
        "model.arch",
        "method.name",
        "method.key_bn",
        "method.intra.kind",
        "method.inter.margin_type",
        "method.inter.neg_sampling",
        "method.inter.pool_threshold",
        "method.inter.labels",
        "method.inter.bank_dtype",
        "optim.name",
        "optim.schedule",
        "train.precision",
        "monitor.knn_split",
        "eval.protocol",
    }
    assert expected <= set(SCHEMA_CHOICES)
    from interclr_cli.config import choice_keys, choices

    assert choice_keys() == SCHEMA_CHOICES
    assert choices("method.inter.neg_sampling") == SCHEMA_CHOICES["method.inter.neg_sampling"]
    assert choices("optim.lr") == ()
    with pytest.raises(UserError, match="did you mean 'method.inter.neg_sampling'"):
        choices("method.inter.neg_samplng")
    # every default is one of its key's choices
    defaults = Config()
    from interclr_cli.config.loader import get_key

    for key, allowed in SCHEMA_CHOICES.items():
        assert get_key(defaults, key) in allowed, key


@pytest.mark.parametrize("key", sorted(SCHEMA_CHOICES))
def test_a_bad_choice_lists_exactly_the_schema_values(key):
    allowed = SCHEMA_CHOICES[key]
    with pytest.raises(UserError) as e:
        load_config(None, [f"{key}=zzzz"])
    assert str(e.value) == f"{key} must be one of {', '.join(allowed)}; got 'zzzz'"
    for value in allowed:  # a near miss of each value suggests that value
        with pytest.raises(UserError) as e:
            load_config(None, [f"{key}={value}x"])
        assert str(e.value) == f"{key} must be one of {', '.join(allowed)}; got '{value}x' (did you mean '{value}'?)"
        cfg = load_config(None, [f"{key}={value}"])  # and each value itself is accepted
        from interclr_cli.config.loader import get_key

        assert get_key(cfg, key) == value


def test_a_bad_choice_in_a_preset_file_or_set_in_code_is_an_error(tmp_path):
    from interclr_cli.config import validate

    p = tmp_path / "bad.yaml"
    p.write_text("method:\n  inter:\n    pool_threshold: sample\n")
    with pytest.raises(
        UserError,
        match=r"method.inter.pool_threshold must be one of exact, sampled; got 'sample' \(did you mean 'sampled'\?\)",
    ):
        load_config(str(p))
    cfg = load_config(None)
    cfg.method.name = "simclr"  # a Config changed in code is re-checked by validate()
    with pytest.raises(UserError, match="method.name must be one of mocov2, interclr, npid, invp; got 'simclr'"):
        validate(cfg)


def test_registries_agree_with_the_schema():
    """A new backbone, method or data source must be declared in the schema's Literal too."""
    from interclr_cli.data.sources import SOURCES
    from interclr_cli.losses import MARGIN_TYPES
    from interclr_cli.memory import NEG_MODES, THRESHOLDS
    from interclr_cli.methods import METHODS
    from interclr_cli.models import BACKBONES

    assert tuple(BACKBONES) == SCHEMA_CHOICES["model.arch"]
    assert tuple(METHODS) == SCHEMA_CHOICES["method.name"]
    assert tuple(SOURCES) == SCHEMA_CHOICES["data.source"]
    assert NEG_MODES == SCHEMA_CHOICES["method.inter.neg_sampling"]
    assert THRESHOLDS == SCHEMA_CHOICES["method.inter.pool_threshold"]
    assert MARGIN_TYPES == SCHEMA_CHOICES["method.inter.margin_type"]


def test_key_table_covers_every_key_with_its_default_and_choices():
    from interclr_cli.config import key_table

    rows = {r["key"]: r for r in key_table()}
    assert list(rows) == all_keys()
    assert rows["optim.lr"] == {"key": "optim.lr", "type": "number", "default": 0.03, "choices": []}
    assert rows["data.mean"]["default"] == [0.485, 0.456, 0.406] and rows["data.mean"]["type"] == "list of number"
    for key, allowed in SCHEMA_CHOICES.items():
        assert rows[key]["type"] == "choice" and rows[key]["choices"] == list(allowed)


def test_presets_keys_json_lists_types_defaults_and_choices():
    import json

    from conftest import run_cli

    res = run_cli("presets", "keys", "--json")
    assert res.returncode == 0, res.stderr
    keys = json.loads(res.stdout)
    assert set(keys) == set(all_keys())
    assert keys["method.inter.neg_sampling"] == {
        "type": "choice",
        "default": "semihard",
        "choices": list(SCHEMA_CHOICES["method.inter.neg_sampling"]),
    }
    assert keys["train.epochs"] == {"type": "integer", "default": 200, "choices": []}
    table = run_cli("presets", "keys")
    assert table.returncode == 0, table.stderr
    assert "method.inter.neg_sampling" in table.stdout and "semieasy" in table.stdout

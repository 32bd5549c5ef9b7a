"""SLO-class TOML loading and validation: every error names the field and the class."""

from __future__ import annotations

from pathlib import Path

import pytest

from slonn.policy.names import Mode, OnLate
from slonn.scheduler.config import ServerConfig, SLOClassConfig, load_classes

GOOD = """
[[class]]
name = "interactive"
latency_ms = 20
min_accuracy = 0.95
priority = 1
max_queue = 256
on_late = "reject"

[[class]]
name = "batch"
latency_ms = 500
min_accuracy = 0.97
priority = 2
max_queue = 4096
on_late = "serve"
mode = "accuracy"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "classes.toml"
    path.write_text(text)
    return path


def one_class(**fields) -> str:
    entry = {"name": "c", "latency_ms": 20, **fields}
    body = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in entry.items())
    return f"[[class]]\n{body}\n"


def test_load_classes_from_toml(tmp_path):
    classes = load_classes(write(tmp_path, GOOD))
    assert list(classes) == ["interactive", "batch"]
    assert classes["interactive"] == SLOClassConfig("interactive", 20, 0.95, 1, 256, "reject", "latency")
    assert classes["batch"] == SLOClassConfig("batch", 500, 0.97, 2, 4096, "serve", "accuracy")


def test_whole_numbers_in_float_fields_are_stored_as_floats(tmp_path):
    c = load_classes(write(tmp_path, GOOD))["interactive"]  # latency_ms = 20 in the file
    assert type(c.latency_ms) is float and c.latency_ms == 20.0
    assert type(c.priority) is int


def test_defaults_fill_optional_fields(tmp_path):
    classes = load_classes(write(tmp_path, one_class()))
    c = classes["c"]
    assert (c.min_accuracy, c.priority, c.max_queue, c.on_late, c.mode) == (0.0, 1, 1024, "reject", "latency")


def test_mode_and_on_late_strings_are_stored_as_the_members_they_name():
    c = SLOClassConfig("c", latency_ms=5, on_late="serve", mode="accuracy")
    assert c.on_late is OnLate.SERVE and c.mode is Mode.ACCURACY
    assert (c.on_late, c.mode) == ("serve", "accuracy") and f"{c.mode}" == "accuracy"


def test_packaged_default_classes_load():
    classes = load_classes()
    assert classes, "the packaged slo_classes.toml defines classes"
    assert all(isinstance(c, SLOClassConfig) and c.name == name for name, c in classes.items())


@pytest.mark.parametrize(("field", "value"), [
    ("latency_ms", 0),
    ("latency_ms", -5),
    ("min_accuracy", 1.5),
    ("min_accuracy", -0.1),
    ("priority", -1),
    ("max_queue", 0),
    ("on_late", "drop"),
    ("mode", "fast"),
])
def test_each_invalid_value_names_its_field(tmp_path, field, value):
    with pytest.raises(ValueError) as info:
        load_classes(write(tmp_path, one_class(**{field: value})))
    message = str(info.value)
    assert f"{field}=" in message
    assert "class 'c'" in message


def test_error_message_has_value_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"class 'c': latency_ms=0 must be > 0"):
        load_classes(write(tmp_path, one_class(latency_ms=0)))


def test_nan_latency_is_rejected():
    with pytest.raises(ValueError, match="latency_ms=nan"):
        SLOClassConfig("c", float("nan"))


def test_unknown_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['latency'\]"):
        load_classes(write(tmp_path, one_class(latency=5)))


def test_duplicate_class_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="defined twice"):
        load_classes(write(tmp_path, one_class() + one_class()))


def test_file_without_classes_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"no \[\[class\]\] tables"):
        load_classes(write(tmp_path, "# nothing here\n"))


def test_empty_class_name_is_rejected():
    with pytest.raises(ValueError, match="name"):
        SLOClassConfig("", 20)


def test_missing_required_field_names_it(tmp_path):
    with pytest.raises((ValueError, TypeError), match="latency_ms"):
        load_classes(write(tmp_path, '[[class]]\nname = "c"\n'))


def test_wrongly_typed_value_names_its_field(tmp_path):
    with pytest.raises(ValueError, match="latency_ms"):
        load_classes(write(tmp_path, '[[class]]\nname = "c"\nlatency_ms = "20"\n'))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"model_dirs": ()}, "model_dirs"),
    ({"workers": 0}, "workers"),
    ({"threads": 0}, "threads"),
    ({"max_batch": 0}, "max_batch"),
    ({"max_batch": 2000}, "max_batch"),
    ({"max_inflight": 0}, "max_inflight"),
    ({"precision": "fp8"}, "precision"),
    ({"max_pending": -1}, "max_pending"),
    ({"max_message_bytes": 100}, "max_message_bytes"),
    ({"overhead_ms": -1.0}, "overhead_ms"),
    ({"grace_s": -1.0}, "grace_s"),
    ({"classes": {}}, "SLO classes"),
])
def test_server_config_validation_names_the_field(kwargs, field):
    base = {"model_dirs": (Path("m"),), "classes": {"c": SLOClassConfig("c", 20)}}
    with pytest.raises(ValueError, match=field):
        ServerConfig(**{**base, **kwargs})


def test_oip_flags_reach_the_config_and_are_checked(tmp_path):
    import argparse

    from slonn.scheduler.config import ServerConfig, load_classes
    from slonn.scripts.serve import add_server_args, config_from_args

    p = argparse.ArgumentParser()
    add_server_args(p)
    cfg = config_from_args(p.parse_args(["--http-port", "0", "--default-class", "batch"]))
    assert (cfg.http_port, cfg.default_class) == (0, "batch")
    assert config_from_args(p.parse_args([])).http_port is None  # HTTP is off unless asked for
    classes = load_classes()
    with pytest.raises(ValueError, match="default_class='gold'"):
        ServerConfig(model_dirs=(tmp_path,), classes=classes, default_class="gold")
    with pytest.raises(ValueError, match="http_port=70000"):
        ServerConfig(model_dirs=(tmp_path,), classes=classes, http_port=70000)


def test_relative_floor_and_per_model_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[class]]\nname = "fast"\nlatency_ms = 20\nmin_accuracy = 0.9\nmax_accuracy_drop = 0.01\n'
                    '[class.model.tabular]\nmin_accuracy = 0.0\nlatency_ms = 50\n')
    fast = load_classes(path)["fast"]
    # Both floors hold: the absolute one and 0.01 below the model's dense accuracy.
    assert fast.for_model("digits", 0.98).min_accuracy == pytest.approx(0.97)
    assert fast.for_model("digits", 0.85).min_accuracy == pytest.approx(0.9)
    tab = fast.for_model("tabular", 0.80)
    assert (tab.min_accuracy, tab.latency_ms) == (pytest.approx(0.79), 50.0)


@pytest.mark.parametrize("text, match", [
    ('[class.model.m]\nlatency_ms = 0\n', r"class 'c', model 'm': class 'c': latency_ms=0 must be > 0"),
    ('[class.model.m]\nspeed = 1\n', r"model 'm': unknown keys \['speed'\]"),
    ('max_accuracy_drop = 2\n', r"max_accuracy_drop=2 must be in \[0, 1\]"),
])
def test_bad_overrides_name_the_class_and_model(tmp_path, text, match):
    path = tmp_path / "c.toml"
    path.write_text('[[class]]\nname = "c"\nlatency_ms = 20\n' + text)
    with pytest.raises(ValueError, match=match):
        load_classes(path)


def test_the_message_limit_fits_a_full_batch_of_the_widest_model(tmp_path):
    import argparse
    from types import SimpleNamespace

    from slonn.scheduler.config import ServerConfig, load_classes
    from slonn.scheduler.server import BYTES_PER_VALUE, message_limit
    from slonn.scripts.serve import add_server_args, config_from_args

    def manifests(*widths):
        return {f"m{w}": SimpleNamespace(arch=SimpleNamespace(in_features=w)) for w in widths}

    classes = load_classes()
    auto = ServerConfig(model_dirs=(tmp_path,), classes=classes, max_batch=64)
    assert message_limit(auto, manifests(64)) == 4 << 20  # gRPC's default where a batch fits in it
    wide = ServerConfig(model_dirs=(tmp_path,), classes=classes, max_batch=1024)
    assert message_limit(wide, manifests(64, 1024)) == BYTES_PER_VALUE * 1024 * 1024 > 4 << 20
    fixed = ServerConfig(model_dirs=(tmp_path,), classes=classes, max_message_bytes=8192)
    assert message_limit(fixed, manifests(1024)) == 8192
    p = argparse.ArgumentParser()
    add_server_args(p)
    assert config_from_args(p.parse_args(["--max-message-bytes", "65536"])).max_message_bytes == 65536
    assert config_from_args(p.parse_args([])).max_message_bytes == 0

"""The typed config loader: composition order, overrides, and one-line errors naming the key."""

from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from vitscale_common.config_loader import ConfigError, load_config, save_config


@dataclass
class Inner:
    depth: int = 12
    name: str = "tiny"
    sizes: List[int] = field(default_factory=lambda: [1, 2])


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    lr: Optional[float] = None


def write(path, text):
    path.write_text(text)
    return path


def test_files_merge_in_order_then_overrides_win(tmp_path):
    write(tmp_path / "base.yaml", "inner: {depth: 3, name: base}\nlr: 0.5\n")
    top = write(tmp_path / "top.yaml", "_base_: [base.yaml]\ninner: {name: top}\n")
    cfg = load_config(Outer, [top], ["lr=0.25", "inner.sizes=[4,5,6]"])
    assert cfg == Outer(inner=Inner(depth=3, name="top", sizes=[4, 5, 6]), lr=0.25)


@pytest.mark.parametrize(
    "override, key",
    [("inner.depth=oops", "inner.depth"), ("inner.nope=1", "inner.nope"), ("bogus=2", "bogus")],
)
def test_bad_override_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, [], [override])
    message = str(err.value)
    assert key in message and "\n" not in message


def test_bad_key_in_file_names_file_and_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "inner: {widht: 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: inner\.widht"):
        load_config(Outer, [bad])


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, [tmp_path / "absent.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, [], ["lr"])


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Outer, [tmp_path / "a.yaml"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(Outer, [], ["inner.depth=7", "lr=0.1"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Outer, [tmp_path / "config.yaml"]) == cfg

"""Config validation: one typed tree; errors name the file and the field; overrides; the annotated default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peer import config
from peer.errors import ConfigError, UnknownNameError

BASE = ["node_id=a", "state_dir=/tmp/peer-test-state"]


def test_defaults_and_overrides() -> None:
    cfg = config.load(None, [*BASE, "algorithm.epsilon=0.5", "discovery.static_peers=[h:1, 'k:2']", "train.lr=1e-3"])
    assert cfg.algorithm.name == "cdl" and cfg.algorithm.epsilon == 0.5  # type: ignore[union-attr]
    assert cfg.discovery.static_peers == ["h:1", "k:2"]
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.listen_port == 0 and cfg.listen_host == "127.0.0.1"


@pytest.mark.parametrize(
    "overrides,field,text",
    [
        (["state_dir=/tmp/x"], "node_id", "required"),
        ([*BASE, "gossip.intervl_s=1"], "gossip.intervl_s", "unknown field"),
        ([*BASE, "train.lr=-1"], "train.lr", "greater than 0"),
        ([*BASE, "train.batch_size=many"], "train.batch_size", "integer"),
        ([*BASE, "listen=1.2.3.4"], "listen", "host:port"),
        ([*BASE, "listen=myhost:80"], "listen", "IP address"),
        ([*BASE, "discovery.static_peers=[nohost]"], "discovery.static_peers", "host:port"),
        ([*BASE, "algorithm.epsilon=2"], "algorithm.epsilon", "less than or equal to 1"),
        ([*BASE, "topology=star"], "topology", "valid names: exponential, full, one-peer"),
        ([*BASE, "data.num_partitions=2", "data.partition_index=2"], "data", "partition_index"),
        ([*BASE, "node_id=has space"], "node_id", "pattern"),
        ([*BASE, "data.dataset=cifar"], "data.dataset", "valid names: digits, mnist1d"),
        ([*BASE, "data.partition=shards:x"], "data.partition", "shards"),
        ([*BASE, "model.name=resnet"], "model.name", "valid names: cnn, logreg, mlp"),
    ],
)
def test_errors_name_the_field(overrides: list[str], field: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, overrides)
    assert info.value.field == field
    assert field in str(info.value) and text in str(info.value)


def test_state_dir_follows_node_id_unless_set() -> None:
    """Trap: `--set node_id=robot-7` used to keep `./state/peer-1`; the state dir now follows the node id."""
    assert config.load(None, ["node_id=robot-7"]).state_dir == "./state/robot-7"
    assert config.load(None, ["node_id=robot-7", "state_dir=null"]).state_dir == "./state/robot-7"
    assert config.load(None, ["node_id=robot-7", "state_dir=/srv/x"]).state_dir == "/srv/x"
    text = (Path(config.__file__).parent / "default_config.yaml").read_text()
    assert config.validate({**yaml.safe_load(text), "node_id": "robot-7"}, source="t").state_dir == "./state/robot-7"


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    """Trap: a YAML syntax error said `in "<unicode string>"`; it now names the file, line and column."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("node_id: a\ntrain: [1,\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        config.load(bad)
    text = str(info.value)
    assert text.startswith(f"{bad}: not valid YAML at line ") and "column" in text
    assert "<unicode string>" not in text and "\n" not in text


def test_unknown_algorithm_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        config.load(None, [*BASE, "algorithm.name=fedavg"])
    assert "cdl" in str(info.value) and "none" in str(info.value) and info.value.field == "algorithm.name"


def test_parameters_of_another_algorithm_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.epsilon: unknown field"):
        config.load(None, [*BASE, "algorithm.name=none", "algorithm.epsilon=0.5"])


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        config.load(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("node_id: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        config.load(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("node_id: a\nstate_dir: s\ntrain:\n  epochs: zero\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: train\.epochs"):
        config.load(wrong)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(listy)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        config.load(None, [*BASE, "train.lr"])


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def test_annotated_default_config_is_complete_and_valid() -> None:
    """`peer init-config` prints every field with its real default, and the configuration reference documents
    every key."""
    text = (Path(config.__file__).parent / "default_config.yaml").read_text()
    raw = yaml.safe_load(text)
    cfg = config.validate(raw, source="default_config.yaml")
    dumped = yaml.safe_load(config.dump(cfg))
    assert _leaves(raw) == _leaves(dumped)
    assert raw["state_dir"] is None and dumped["state_dir"] == f"./state/{raw['node_id']}"  # follows node_id
    assert {**raw, "state_dir": dumped["state_dir"]} == dumped  # the annotations show the true defaults
    reference = (Path(config.__file__).parents[1] / "docs" / "reference" / "configuration.md").read_text()
    undocumented = [k for k in sorted(_leaves(raw)) if f"`{k}`" not in reference]
    assert not undocumented, f"the configuration reference does not document: {undocumented}"


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = config.load(None, [*BASE, "train.epochs=3"])
    path = tmp_path / "c.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(path) == cfg


def test_model_names_match_the_model_zoo() -> None:
    from peer.learn.models import MODEL_NAMES

    assert config.MODEL_NAMES == MODEL_NAMES


def test_readme_documents_every_algorithm_and_parameter() -> None:
    from peer.algorithms import REGISTRY

    reference = (Path(config.__file__).parents[1] / "docs" / "reference" / "configuration.md").read_text()
    for name, cls in REGISTRY.items():
        heading = f"### `algorithm.name: {name}`"
        assert heading in reference, f"the configuration reference has no parameter table for {name}"
        section = reference.split(heading, 1)[1].split("\n### ", 1)[0]
        for field in cls.params_type.model_fields:
            if field != "name":
                assert f"`algorithm.{field}`" in section, f"the reference does not document {name}'s {field}"
        # A config naming the algorithm validates with its defaults.
        assert (
            config.validate(
                {"node_id": "a", "state_dir": "/tmp/x", "algorithm": {"name": name}}, source="test"
            ).algorithm.name
            == name
        )

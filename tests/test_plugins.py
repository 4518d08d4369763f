"""User plugins: a model factory with BatchNorm trained by three daemons against centralized training, buffers
mixed or kept local as documented, every plugin error named by field and function, and a growing shards dir."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import pytest
import torch
import yaml

from examples.custom_model import bn_cnn, digits_data, write_shard
from peer import cli
from peer.algorithms import create
from peer.config import PeerConfig
from peer.daemon.node import Node
from peer.learn.models import build_model, exchanged_tensors, flatten_params, load_flat_params, schema_fingerprint
from peer.learn.sources import evaluate_dataset, load_task_data
from peer.learn.streams import BatchStream
from peer.learn.training import LocalTrainer, scheduled_lr
from tests.helpers import consensus_distance, fast_config, start_nodes, stop_nodes, unique, until

BN = "examples.custom_model:bn_cnn"
DIGITS = "examples.custom_model:digits_data"


def _bn_config(tmp_path: Path, node_id: str, **more: object) -> PeerConfig:
    return fast_config(
        tmp_path,
        node_id,
        **{"model.factory": BN, "model.kwargs": {"width": 8}, "data.factory": DIGITS, **more},  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------------------------------ buffers
def test_float_buffers_are_exchanged_and_integer_buffers_stay_local() -> None:
    model = bn_cnn((1, 8, 8), 10, width=4)
    names = [n for n, _ in exchanged_tensors(model, buffers=True)]
    assert "1.running_mean" in names and "1.running_var" in names
    assert not any(n.endswith("num_batches_tracked") for n in names)
    assert [n for n, _ in exchanged_tensors(model, buffers=False)] == [n for n, _ in model.named_parameters()]
    flat = flatten_params(model, buffers=True)
    load_flat_params(model, torch.full_like(flat, 0.5), buffers=True)
    bn = model[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert torch.all(bn.running_var == 0.5) and int(bn.num_batches_tracked) == 0  # type: ignore[arg-type]
    # Peers that disagree on the buffer rule (or on the model) refuse each other.
    assert schema_fingerprint(model, buffers=True) != schema_fingerprint(model, buffers=False)
    assert schema_fingerprint(model) != schema_fingerprint(bn_cnn((1, 8, 8), 10, width=8))


@pytest.mark.parametrize("name,mixes", [("cdl", True), ("none", True), ("dpsgd", False), ("sgp", False)])
def test_the_buffer_rule_per_algorithm(name: str, mixes: bool, tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, "a", algorithm={"name": name})
    algo = create(cfg.algorithm, "a")
    assert algo.mixes_buffers is mixes and algo.mixes_buffers is not algo.owns_local_update


def test_same_seed_same_model_and_global_rng_untouched() -> None:
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    a = build_model("mlp", (1, 8, 8), 10, seed=3, factory=BN, kwargs={"width": 4})
    b = build_model("mlp", (1, 8, 8), 10, seed=3, factory=BN, kwargs={"width": 4})
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(flatten_params(a, buffers=True), flatten_params(b, buffers=True))


# ------------------------------------------------------------------------------------ 3 daemons vs central
@pytest.mark.timeout(240)
async def test_three_daemons_with_batchnorm_match_centralized_training(tmp_path: Path) -> None:
    cluster = unique("bn")
    n, epochs = 3, 15
    train = {"epochs": epochs, "lr": 0.05, "wait_for_neighbors_s": 20, "round_interval_s": 0.0, "steps_per_round": 1}
    nodes = [
        Node(
            _bn_config(
                tmp_path,
                f"{cluster}-{i}",
                discovery={"mdns": True, "cluster": cluster},
                **{"data.num_partitions": n, "data.partition_index": i, "train": train},
            ),
            stdout=io.StringIO(),
        )
        for i in range(n)
    ]
    tasks = await start_nodes(nodes)
    try:
        await until(nodes, lambda: all(len(x.core.neighbours()) == n - 1 for x in nodes), 30, "discovery")
        await asyncio.wait_for(asyncio.gather(*(x.trained.wait() for x in nodes)), timeout=150)
        await until(nodes, lambda: consensus_distance([x.trainer.get_flat() for x in nodes]) < 1e-3, 30, "consensus")
    finally:
        await stop_nodes(nodes, tasks)
    test = nodes[0].dataset.test
    assert test is not None
    peer_accs = [evaluate_dataset(x.trainer.model, test)[0] for x in nodes]
    # BatchNorm running statistics were mixed with the weights (cdl): the peers agree on them too.
    stats = [x.trainer.model[1].running_var.clone() for x in nodes]  # type: ignore[index]
    assert consensus_distance(stats) < 1e-2

    # Centralized: the same factory, seed, optimizer and epochs on all the training data at once.
    cfg = nodes[0].cfg
    full_train, _ = digits_data()
    model = build_model("mlp", (1, 8, 8), 10, seed=cfg.model.seed, factory=BN, kwargs={"width": 8})
    stream = BatchStream(full_train, batch_size=32, num_workers=0, device=torch.device("cpu"), seed=0)
    trainer = LocalTrainer(
        model,
        None,
        None,
        batch_size=32,
        lr=0.05,
        momentum=0.9,
        weight_decay=0.0,
        optimizer="sgd",
        device=torch.device("cpu"),
        seed=0,
        stream=stream,
    )
    total = epochs * trainer.steps_per_epoch
    for t in range(total):
        trainer.set_lr(scheduled_lr(0.05, "cosine", t, total))
        trainer.step()
    central = evaluate_dataset(model, test)[0]
    print(f"BN 3 daemons: {[round(a, 4) for a in peer_accs]}; centralized {central:.4f}")
    assert min(peer_accs) >= central - 0.02


# ---------------------------------------------------------------------------------------- plugin errors
def _run_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], **sections: object) -> str:
    raw = fast_config(tmp_path, unique("e"), **sections).model_dump(mode="json")  # type: ignore[arg-type]
    path = tmp_path / "peer.yaml"
    path.write_text(yaml.safe_dump(raw))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert cli.main(["run", "--config", str(path)]) == 2
    finally:  # `peer run` sets up logging on the captured stderr: leave the process as it was
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "sections,expected",
    [
        ({"model.factory": "no_such_pkg.models:net"}, ["model.factory", "cannot import module 'no_such_pkg.models'"]),
        ({"model.factory": "examples.custom_model:nope"}, ["model.factory", "has no attribute 'nope'"]),
        ({"model.factory": "tests.helpers:raising_model"}, ["model.factory", "raising_model raised RuntimeError"]),
        ({"model.factory": "tests.helpers:not_a_module"}, ["model.factory", "must return a torch.nn.Module"]),
        ({"model.factory": "tests.helpers:wrong_width_model"}, ["model.factory", "outputs shape (2, 11)"]),
        ({"data.factory": "tests.helpers:raising_data"}, ["data.factory", "raising_data raised OSError"]),
        ({"data.factory": "tests.helpers:list_data"}, ["data.factory", "must return a (train, test) tuple"]),
        ({"data.factory": "no_such_pkg:data"}, ["data.factory", "cannot import module"]),
        ({"train.loss": "tests.helpers:non_scalar_loss"}, ["train.loss", "non_scalar_loss must return a scalar"]),
        ({"train.loss": "no_such_pkg:loss"}, ["train.loss", "cannot import module"]),
    ],
)
def test_a_plugin_error_names_the_field_and_the_function(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sections: dict[str, object], expected: list[str]
) -> None:
    err = _run_cli(tmp_path, capsys, **sections)
    for text in expected:
        assert text in err, err


def test_a_malformed_plugin_name_is_a_config_error(tmp_path: Path) -> None:
    from peer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.factory"):
        fast_config(tmp_path, "a", **{"model.factory": "not a function"})


@pytest.mark.timeout(60)
async def test_peers_whose_models_differ_refuse_each_other_naming_the_mismatch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = Node(_bn_config(tmp_path, unique("a"), **{"train.epochs": 50}), stdout=io.StringIO())
    tasks = await start_nodes([a])
    b = Node(
        _bn_config(
            tmp_path,
            unique("b"),
            **{"model.kwargs": {"width": 4}, "discovery.static_peers": [a.address], "train.epochs": 50},
        ),
        stdout=io.StringIO(),
    )
    tasks += await start_nodes([b])
    try:
        await until([a, b], lambda: "schema fingerprint" in caplog.text, 30, "a refusal naming the schema")
        assert "model.kwargs" in caplog.text
        assert not a.core.neighbours() and not b.core.neighbours()
    finally:
        await stop_nodes([a, b], tasks)


# -------------------------------------------------------------------------------------------- shards dir
@pytest.mark.timeout(90)
async def test_a_shard_added_while_running_is_trained_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    shards = tmp_path / "shards"
    train, _ = digits_data()
    x, y = train.tensors
    first, second = slice(0, 200), slice(200, 400)
    write_shard(shards, "000.npz", x[first].numpy(), y[first].numpy())
    cfg = fast_config(
        tmp_path,
        unique("s"),
        data={"shards_dir": str(shards)},
        model={"name": "logreg"},
        train={"epochs": 1000, "batch_size": 50},
    )
    node = Node(cfg, stdout=io.StringIO())
    tasks = await start_nodes([node])
    try:
        shards_ds = node.dataset.shards
        assert shards_ds is not None and shards_ds.files == ["000.npz"]
        await until([node], lambda: node.trainer.step_count > 0, 30, "training on the first shard")
        write_shard(shards, "001.npz", x[second].numpy(), y[second].numpy())
        await until([node], lambda: shards_ds.num_trained == 2, 30, "training on the new shard")
        assert len(shards_ds) == 400
        await until([node], lambda: _last_metrics(node).get("shards_trained") == 2, 30, "metrics counting it")
        assert "training on 1 new shard(s): 001.npz" in caplog.text
    finally:
        await stop_nodes([node], tasks)


def _last_metrics(node: Node) -> dict[str, object]:
    import json

    path = node.state_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return dict(json.loads(lines[-1])) if lines else {}


def test_image_folder_loads_classes_and_splits(tmp_path: Path) -> None:
    from examples.custom_model import make_image_folder
    from peer.config import DataConfig

    make_image_folder(tmp_path / "imgs", per_class=5, size=12)
    data = load_task_data(DataConfig(image_folder=str(tmp_path / "imgs"), test_fraction=0.2))
    assert data.num_classes == 10 and data.input_shape == (1, 12, 12)
    assert data.num_train == 40 and data.test is not None and len(data.test) == 10  # type: ignore[arg-type]
    x0, y0 = data.train[0]  # type: ignore[index]
    assert x0.dtype == torch.float32 and float(x0.min()) >= 0.0 and float(x0.max()) <= 1.0 and isinstance(y0, int)


def test_mse_and_a_user_loss_train(tmp_path: Path) -> None:
    for loss in ("mse", "torch.nn.functional:cross_entropy"):
        cfg = fast_config(tmp_path, unique("l"), **{"train.loss": loss})
        from peer.daemon.builder import build
        from peer.daemon.metrics import Counters
        from peer.logs import node_logger

        built = build(cfg, reset=False, counters=Counters(), log=node_logger("t", "t"))
        losses = [built.trainer.step() for _ in range(20)]
        assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------- demo
def test_demo_takes_factories_and_its_references_use_them(tmp_path: Path) -> None:
    import argparse

    from peer.tools import demo
    from peer.tools.demo_eval import reference_accuracies, task_arrays

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(
        [
            "--peers",
            "2",
            "--epochs",
            "1",
            "--set",
            f"model.factory={BN}",
            "--set",
            "model.kwargs={width: 4}",
            "--set",
            f"data.factory={DIGITS}",
        ]
    )
    cfgs = [c for _, c in demo.build_configs(args, tmp_path)]
    assert cfgs[1].model.factory == BN and cfgs[1].data.factory == DIGITS
    task = task_arrays(cfgs)
    full, test = digits_data()
    assert sum(len(y) for _, y in task.parts) == len(full) and len(task.y_test) == len(test)
    central, local = reference_accuracies(cfgs, torch.device("cpu"))
    assert len(local) == 2 and 0.1 < central.accuracy <= 1.0


@pytest.mark.timeout(60)
async def test_peer_eval_reports_loss_for_a_regression_loss(tmp_path: Path) -> None:
    from peer.tools.evaluate import evaluate_state_dir

    cfg = _bn_config(tmp_path, unique("r"), **{"train.loss": "mse", "train.epochs": 1})
    async with Node(cfg, stdout=io.StringIO()) as node:
        await node.trained.wait()
    result = evaluate_state_dir(cfg.state_dir)
    assert result["task"] == "regression" and result["accuracy"] is None and result["loss"] > 0

"""A custom CNN with BatchNorm on a locally generated image folder, trained by three peers over loopback.

    python examples/image_folder.py        # from the repository root

The same run from the shell, one daemon per terminal (i = 0, 1, 2):

    peer run --config peer.yaml --set node_id=cam-$i --set state_dir=state/cam-$i \\
        --set model.factory=examples.custom_model:bn_cnn --set data.image_folder=images \\
        --set data.num_partitions=3 --set data.partition_index=$i
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `examples` and `peer` import from a clone

import peer
import peer.config
from examples.custom_model import make_image_folder
from peer.learn.sources import evaluate_dataset


async def run(work: Path, epochs: float = 30, peers: int = 3) -> list[float]:
    images = make_image_folder(work / "images", per_class=40, size=16)
    cluster = f"images-{os.getpid()}"
    configs = [
        {
            "node_id": f"cam-{i}",
            "state_dir": str(work / f"cam-{i}"),
            "discovery": {"cluster": cluster, "interfaces": ["127.0.0.1"]},
            "model": {"factory": "examples.custom_model:bn_cnn", "kwargs": {"width": 8}},
            "data": {"image_folder": str(images), "num_partitions": peers, "partition_index": i},
            "train": {"epochs": epochs, "batch_size": 16, "lr": 0.05, "device": "cpu", "torch_threads": 1},
        }
        for i in range(peers)
    ]
    nodes = [peer.Node(peer.config.validate(c, source="example"), stdout=io.StringIO()) for c in configs]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node)
        await asyncio.gather(*(n.trained.wait() for n in nodes))
    accs = []
    for n in nodes:
        assert n.dataset.test is not None
        accs.append(evaluate_dataset(n.trainer.model, n.dataset.test)[0])
        print(f"{n.cfg.node_id}: test accuracy {100 * accs[-1]:.1f}% on {len(n.dataset.test)} held-out images")
    return accs


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))

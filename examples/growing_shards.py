"""A directory of .npz shards that grows while the daemon trains: a "robot" adds a shard every few steps, and
the daemon picks each one up at its next epoch, logs it and counts it in metrics.jsonl (shards_loaded,
shards_trained).

    python examples/growing_shards.py      # from the repository root

From the shell: `peer run --config peer.yaml --set data.shards_dir=shards`, then drop files into shards/
(write under another name, then rename, as `write_shard` does, so a half-written file is never read).
"""

from __future__ import annotations

import asyncio
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `examples` and `peer` import from a clone

import peer
import peer.config
from examples.custom_model import digits_data, write_shard


async def run(work: Path, num_shards: int = 4) -> tuple[int, int]:
    train, _ = digits_data()
    x, y = (t.numpy() for t in train.tensors)
    pieces = [(x[i::num_shards], y[i::num_shards]) for i in range(num_shards)]
    shards = work / "shards"
    write_shard(shards, "0000.npz", *pieces[0])
    cfg = peer.config.validate(
        {
            "node_id": "robot-1",
            "state_dir": str(work / "robot-1"),
            "discovery": {"mdns": False},
            "model": {"factory": "examples.custom_model:bn_cnn", "kwargs": {"width": 8}},
            "data": {"shards_dir": str(shards)},
            "train": {"epochs": 1000, "device": "cpu", "torch_threads": 1, "wait_for_neighbors_s": 0},
            "metrics": {"interval_s": 0.2},
        },
        source="example",
    )
    async with peer.Node(cfg, stdout=io.StringIO()) as node:
        data = node.dataset.shards
        assert data is not None
        for i in range(1, num_shards):
            # The robot records a new shard once the daemon has trained on everything it has so far.
            await node.wait_for(lambda i=i: data.num_trained == i, 60, f"training on the first {i} shard(s)")
            write_shard(shards, f"{i:04d}.npz", *pieces[i])
            print(f"robot: wrote shard {i:04d}.npz at step {node.trainer.step_count}")
        await node.wait_for(lambda: data.num_trained == num_shards, 60, "training on every shard")
        print(f"daemon: trained on {data.num_trained} of {len(data.files)} shards, {len(data)} samples")
        return data.num_trained, len(data)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))

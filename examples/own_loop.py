"""The library API in a plain PyTorch loop: two peers, each training the BatchNorm CNN on half of the digits
with its own optimizer, averaging through `peer.Gossip` after every step.

    python examples/own_loop.py            # from the repository root; prints each peer's test accuracy
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `examples` and `peer` import from a clone

import peer
from examples.custom_model import bn_cnn, digits_data


def train_one(
    index: int,
    state_dir: Path,
    first: list[str],
    started: threading.Event,
    epochs: int,
    results: dict[int, tuple[float, int]],
    algorithm: str = "cdl",
) -> None:
    torch.manual_seed(0)  # the same initial model on both peers
    model = bn_cnn((1, 8, 8), 10, width=8)
    train, test = digits_data(partition_index=index, num_partitions=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = {
        "node_id": f"loop-{index}",
        "state_dir": str(state_dir / f"loop-{index}"),
        "listen": "127.0.0.1:0",  # any free port; the second peer dials the first
        "discovery": {"mdns": False, "static_peers": first if index else []},
        "train": {"device": "cpu", "torch_threads": 1},
        "algorithm": {"name": algorithm},  # cdl (mix mode) or dpsgd (one synchronous round per step)
    }
    if index:
        started.wait()
    merges = 0
    with peer.Gossip(model, config) as gossip:
        if not index:
            first.append(gossip.address)
            started.set()
        gossip.wait_for_neighbours(1, timeout_s=30)  # start together, not one peer alone on its own data
        for _ in range(epochs):
            for x, y in DataLoader(train, batch_size=32, shuffle=True):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                merges += gossip.step()  # merge the neighbour's latest model into ours, here, now
    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        results[index] = (float((model(x).argmax(1) == y).float().mean()), merges)


def main(epochs: int = 5, algorithm: str = "cdl") -> dict[int, tuple[float, int]]:
    """Train both peers (each in a thread, as two robots would each run their own process); returns
    {peer: (test accuracy, steps at which neighbour state was merged)}."""
    first: list[str] = []
    started = threading.Event()
    results: dict[int, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = (Path(tmp), first, started, epochs, results, algorithm)
        threads = [threading.Thread(target=train_one, args=(i, *args)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, (acc, merges) in sorted(results.items()):
        print(f"loop-{i}: test accuracy {100 * acc:.1f}%, merged neighbour state at {merges} steps")
    return results


if __name__ == "__main__":  # python examples/own_loop.py [cdl|dpsgd]
    main(algorithm=sys.argv[1] if len(sys.argv) > 1 else "cdl")

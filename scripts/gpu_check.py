"""Two daemons on one GPU, end to end: the BatchNorm CNN from examples/ with train.amp, digits upscaled to
32x32, gossiping over loopback; then the same on the CPU. Prints steps/s for each and the test accuracy.

Run with scripts/gpu-check. Without a CUDA GPU it says so and exits 0 (or 1 with --require-gpu).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.custom_model import digits_data
from peer.config import validate
from peer.daemon.node import Node
from peer.learn.sources import evaluate_dataset


def upscaled_digits(partition_index: int = 0, num_partitions: int = 1, size: int = 32) -> tuple[object, object]:
    """digits at size x size, so the GPU has some work per step."""
    from torch.utils.data import TensorDataset

    out = []
    for ds in digits_data(partition_index, num_partitions):
        x, y = ds.tensors
        out.append(TensorDataset(torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear"), y))
    return out[0], out[1]


async def two_daemons(work: Path, device: str, amp: bool, epochs: float) -> tuple[float, float]:
    cluster = f"gpu-check-{device}-{time.time_ns()}"
    nodes = []
    for i in range(2):
        raw = {
            "node_id": f"{device}-{i}",
            "state_dir": str(work / f"{device}-{i}"),
            "discovery": {"cluster": cluster, "interfaces": ["127.0.0.1"]},
            "data": {"factory": "scripts.gpu_check:upscaled_digits", "num_partitions": 2, "partition_index": i},
            "model": {"factory": "examples.custom_model:bn_cnn", "kwargs": {"width": 32}},
            "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "device": device, "amp": amp},
        }
        nodes.append(Node(validate(raw, source="gpu-check"), stdout=io.StringIO()))
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        await asyncio.wait_for(asyncio.gather(*(n.trained.wait() for n in nodes)), timeout=300)
    finally:
        for n in nodes:
            n.request_stop()
        await asyncio.gather(*tasks)
    steps_per_s = sum(n.trainer.step_count / max(n.counters.training_s, 1e-9) for n in nodes) / len(nodes)
    test = nodes[0].dataset.test
    assert test is not None
    acc = min(evaluate_dataset(n.trainer.model, test)[0] for n in nodes)
    return steps_per_s, acc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--require-gpu", action="store_true", help="exit 1 when no CUDA GPU is present")
    parser.add_argument("--epochs", type=float, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu-check: SKIPPED: no CUDA GPU here (torch {torch.__version__}, torch.cuda.is_available() is False)")
        return 1 if args.require_gpu else 0
    print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for device, amp in (("cuda", True), ("cuda", False), ("cpu", False)):
            rate, acc = asyncio.run(two_daemons(Path(tmp), device, amp, args.epochs))
            rows.append((device, amp, rate, acc))
            print(f"  {device:4s} amp={amp!s:5s}  {rate:8.1f} steps/s per peer   min test accuracy {100 * acc:.1f}%")
    cpu_rate = rows[-1][2]
    print(f"gpu-check: OK; cuda+amp is {rows[0][2] / cpu_rate:.1f}x the CPU's steps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

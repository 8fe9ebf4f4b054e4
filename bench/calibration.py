"""Machine-calibration figure printed beside every benchmark time.

Machines of the same kind differ up to 2x in speed, so each benchmark also times this fixed small torch
workload in the same run: a reader divides a benchmark time by the calibration time to compare machines.
The workload: one CPU thread, 50 forward+backward+Adam steps of a 784-512-512-10 MLP at batch 256, the best
of 3 repeats (best-of, because a shared machine only ever makes a repeat slower).

    python bench/calibration.py        # prints the figure alone
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def calibration_seconds(repeats=3, steps=50):
    """Seconds for the fixed workload above (best of `repeats`); restores the thread count and RNG."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(256, 784, generator=generator)
        y = torch.randint(0, 10, (256,), generator=generator)
        best = float("inf")
        for _ in range(repeats):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            start = time.perf_counter()
            for _ in range(steps):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            best = min(best, time.perf_counter() - start)
        return best
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def calibration_line():
    """One line for a benchmark's header, e.g. 'calibration: 0.412 s (fixed 1-thread MLP workload, ...)'."""
    return (f"calibration: {calibration_seconds():.3f} s (fixed 1-thread MLP workload, bench/calibration.py; "
            f"a machine twice as slow shows twice this)")


if __name__ == "__main__":
    print(calibration_line())

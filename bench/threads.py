"""Seconds per training step of the default estimators on 1, 2, ... torch threads: the measurement behind the
thread rule (memorycore.devices.DEFAULT_THREADS; README, "CPU threads").

Each setting fits the default MemoryForecaster on bundled ETTh1 and the default DNAClassifier on 512 NonTATA
promoter sequences for a few steps, after one warm-up fit, and prints the median seconds per step.

    python bench/threads.py                      # threads 1 and 2
    python bench/threads.py --threads-list 1,2,4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._arguments import comma_list, positive, writable_path  # noqa: E402
from memorycore.files import write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ETTH1 = ROOT / "datasets" / "ETTh1" / "ETTh1.csv.gz"
PROMOTERS = (ROOT.parent / "shared" / "datasets" / "genomic_benchmarks" / "sequences" / "human_nontata_promoters"
             / "test.csv.gz")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads-list", type=comma_list(int), default=[1, 2], help="thread counts to time")
    parser.add_argument("--steps", type=positive(int), default=5, help="training steps per timed fit")
    parser.add_argument("--repeats", type=positive(int), default=3, help="timed fits per setting (median)")
    parser.add_argument("--out", type=writable_path, default=Path("bench/results/threads.json"))
    return parser.parse_args(argv)


def forecaster_fit(threads: int, steps: int):
    from forecast import MemoryForecaster

    model = MemoryForecaster(epochs=1, max_steps_per_epoch=steps, n_threads=threads, verbose=False)
    return lambda: model.fit(ETTH1)


def classifier_fit(threads: int, steps: int):
    from genomics import DNAClassifier, load_sequences

    import numpy as np

    data = load_sequences(PROMOTERS)  # sorted by class: draw a mixed sample
    pick = np.random.default_rng(0).permutation(len(data))[:128 * steps]  # `steps` default batches of 128
    sequences, labels = [data.sequences[i] for i in pick], [data.labels[i] for i in pick]
    model = DNAClassifier(epochs=1, validation_fraction=0.0, n_threads=threads, verbose=False)
    return lambda: model.fit(sequences, labels)


def seconds_per_step(fit, steps: int, repeats: int) -> float:
    fit()  # warm-up: first-call allocations and imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fit()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    print(f"seconds per training step (median of {args.repeats}); {os.cpu_count()} CPUs, load average {load:.1f}")
    rows = []
    for name, build in (("MemoryForecaster", forecaster_fit), ("DNAClassifier", classifier_fit)):
        cells = {threads: seconds_per_step(build(threads, args.steps), args.steps, args.repeats)
                 for threads in args.threads_list}
        print(f"{name:18s} " + "  ".join(f"{t} thread(s): {s:.3f} s" for t, s in cells.items()), flush=True)
        rows.append({"estimator": name, "seconds_per_step": cells})
    write_text_atomic(args.out, json.dumps({"load_average": load, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

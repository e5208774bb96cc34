"""Time to generate and prepare the synthetic market (features, signals, cache) for growing universes.

    python benchmarks/bench_data.py --quick --json benchmarks/results/data_quick.json   # 10 and 143 symbols, < 60 s
    python benchmarks/bench_data.py --json benchmarks/results/data.json                 # adds 500 symbols, SL at 143

Phases per universe (2 years of hourly bars, 3,528 bars): generate (synthetic bars), features (technical +
regime + splits, no classifiers, no cache), prepare_sl (prepare_market with the MLP/LSTM/GRU fitted, no cache),
cache_read (prepare_market when the parquet cache is warm). Peak RSS is the process peak after each universe.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

from common import machine_info, peak_rss_mib, repeat_timed, summarize, write_json

import market_data as md


def bench_universe(num_symbols: int, repeats: int, with_sl: bool, sl_threads: int) -> dict:
    cfg = md.DataConfig(num_symbols=num_symbols, years=2.0, sl_signals=False, cache=False, sl_threads=sl_threads)
    row = {"num_symbols": num_symbols, "bars": None}
    row["generate"] = summarize(repeat_timed(lambda: md.load_market(cfg), repeats))
    data = md.load_market(cfg)
    row["bars"] = int(data.close.shape[0])
    row["features"] = summarize(repeat_timed(lambda: md.build_prepared(data, cfg), repeats))
    if with_sl:
        t0 = time.perf_counter()
        prepared = md.prepare_market(replace(cfg, sl_signals=True))
        row["prepare_sl"] = {"seconds": time.perf_counter() - t0, "sl_metrics": prepared.sl_metrics}
    with tempfile.TemporaryDirectory() as tmp:
        cached = replace(cfg, cache=True, cache_dir=tmp)
        t0 = time.perf_counter()
        md.prepare_market(cached)
        row["cache_write_total_s"] = time.perf_counter() - t0
        row["cache_read"] = summarize(repeat_timed(lambda: md.prepare_market(cached), repeats, warmup=0))
    row["peak_rss_mib"] = peak_rss_mib()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 and 143 symbols, classifiers only at 10 (< 60 s)")
    parser.add_argument("--json", default=None, help="write the figures to this path")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per phase (default 1 quick, 3)")
    parser.add_argument("--sl-threads", type=int, default=1, help="torch threads for the classifiers")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.sl_threads)
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = [10, 143] if args.quick else [10, 143, 500]
    sl_sizes = {10} if args.quick else {10, 143}
    rows = []
    for n in sizes:
        rows.append(bench_universe(n, repeats, n in sl_sizes, args.sl_threads))
        r = rows[-1]
        sl = f", prepare_sl {r['prepare_sl']['seconds']:.1f}s" if "prepare_sl" in r else ""
        print(
            f"{n:4d} symbols: generate {r['generate']['median_s']:.2f}s, features {r['features']['median_s']:.2f}s"
            f"{sl}, cache_read {r['cache_read']['median_s']:.2f}s, peak RSS {r['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    write_json(
        args.json,
        {
            "benchmark": "bench_data",
            "quick": args.quick,
            "years": 2.0,
            "repeats": repeats,
            "sl_threads": args.sl_threads,
            "note": "other processes may share the CPU; machine facts below",
            "cpu_count": machine_info()["cpu_count"],
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

"""The `dlcore` command line: `dlcore info`, `dlcore bench`, `dlcore train <model>`, `dlcore profile <model>`
(models register themselves in dlcore.registry)."""
from __future__ import annotations

import argparse
import sys


def _bench(args) -> int:
    import torch

    from dlcore import bench, _info
    from dlcore.bench import harness, report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("dlcore bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    cases = bench.all_cases(device, args.op, quick=args.quick)
    info = harness.device_description(device)
    llc = harness.last_level_cache_bytes(device)
    try:
        from rich.progress import Progress
    except ImportError:
        Progress = None
    results = []
    meta = {"versions": _info.collect()["versions"], "quick": args.quick, "argv": sys.argv[1:],
            "allocator": report.allocator_setting()}

    def done(result):  # the report so far, after every case: a run cut short (a time limit) still leaves one
        results.append(result)
        report.write(results, peaks, info, {**meta, "partial": f"{len(results)} of {len(cases)} cases"}, args.out,
                     png=False)

    if Progress is not None:
        with Progress(transient=True) as progress:
            task = progress.add_task("measuring peaks", total=len(cases) + 1)
            peaks = harness.measure_peaks(device, quick=args.quick)
            progress.advance(task)
            for case in cases:
                done(harness.run_case(case, args.quick, llc, lambda text: progress.update(task, description=text)))
                progress.advance(task)
    else:
        peaks = harness.measure_peaks(device, quick=args.quick)
        for i, case in enumerate(cases):
            print(f"[{i + 1}/{len(cases)}] {case.op}: {case.name}", flush=True)
            done(harness.run_case(case, args.quick, llc))
    report.print_table(results, peaks, info)
    paths = report.write(results, peaks, info, meta, args.out)
    print("wrote " + ", ".join(paths.values()))
    failed = [r for r in results if r.errors]
    return 1 if failed and args.strict else 0


def _end_distributed() -> None:
    """Destroy the process group a torchrun training run made: left to the interpreter's exit, gloo's threads were
    torn down joinable now and then ("terminate called without an active exception", SIGABRT in one rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dlcore", description="dlcore: fused kernels for the milestone models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, built extensions, available backends per op")
    b = sub.add_parser("bench", help="time dlcore against stock PyTorch (and torch.compile) in the same run")
    from dlcore.bench import CASE_MODULES

    b.add_argument("--op", action="append", choices=sorted(CASE_MODULES),
                   help="only this op (repeatable); default: all")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    b.add_argument("--quick", action="store_true", help="fewer repeats and cases (under 2 minutes on a CPU)")
    b.add_argument("--out", default="benchmarks/results", help="directory for the JSON, Markdown and PNG reports")
    b.add_argument("--strict", action="store_true", help="exit non-zero when any variant failed")
    from dlcore import registry

    for kind, verb in (("train", "train a milestone model"), ("profile", "training/inference throughput, dlcore vs stock")):
        models = sub.add_parser(kind, help=verb).add_subparsers(dest="model", required=True)
        for name, entry in sorted(registry.entries(kind).items()):
            p = models.add_parser(name, help=entry.help)
            entry.add_arguments(p)
            p.set_defaults(run=entry.run)
    args = parser.parse_args(argv)
    if args.command in registry.KINDS:
        try:
            return int(args.run(args) or 0)
        finally:
            _end_distributed()
    if args.command == "info":
        from dlcore import info

        info()
        return 0
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())

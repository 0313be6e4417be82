"""``tuneforge report RUN [RUN ...]``: charts of one or more runs' metrics and an HTML page comparing them."""

from __future__ import annotations


def add_subcommands(sub) -> None:
    report = sub.add_parser("report", help="charts of one or more runs' metrics and an HTML page comparing them")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with metrics.jsonl)")
    report.add_argument("--output", help="where to write index.html and the PNGs (default: RUN/report for one run, "
                        "report for several)")
    report.add_argument("--overwrite", action="store_true", help="replace a non-empty --output that is not a report")
    report.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from ..run.report import write_report

    print(write_report(args.runs, args.output, overwrite=args.overwrite))
    return 0

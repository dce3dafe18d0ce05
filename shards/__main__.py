"""`python -m shards {synth,pack,verify,stats} ...`: the command line of the shards package."""

from __future__ import annotations

from core.errors import ArgumentParser, run_cli


def main(argv: list[str] | None = None) -> int:
    from shards import pack, synth, verify  # after run_cli's environment check

    parser = ArgumentParser(
        prog="python -m shards",
        description="Render, pack, verify and inspect WebDataset shards of instrument audio.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{synth,pack,verify,stats}")
    for module in (synth, pack, verify):
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run_cli(main)

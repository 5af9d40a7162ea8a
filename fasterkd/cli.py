"""The ``fasterkd`` command line: one sub-command per stage of the paper.

Each handler parses flags and calls the library; no logic lives here. Training, search,
evaluation, prediction and export are wired by :func:`fasterkd.train.add_train_commands`, the
book runner by :func:`fasterkd.book.add_book_command`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fasterkd.utils import parse_size

EPILOG_DATA = """examples:
  fasterkd data synth --out data/synth --n 200 --size 256x512 --split train
  fasterkd data check data/synth --split train --json
"""
EPILOG_ARCH = """examples:
  fasterkd arch import ../shared/reference/fasterseg/arch_1.pt --out student.json
  fasterkd arch show student.json
"""
EPILOG_COST = """examples:
  fasterkd cost --model student --arch student.json --head bilinear --input 1024x2048 --json
  fasterkd cost --model hrnet-w48-ocr --input 1024x2048
"""


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from fasterkd.data.synthetic import write_synthetic

    n = write_synthetic(args.out, n=args.n, size=parse_size(args.size, "--size"), seed=args.seed, split=args.split)
    print(f"wrote {n} synthetic scenes to {args.out} (split {args.split})")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from fasterkd.data import check_dataset

    stats = check_dataset(args.root, split=args.split)
    if args.json:
        print(json.dumps(stats))
    else:
        from fasterkd.data.cityscapes import CLASS_NAMES

        print(f"{stats['images']} images, {stats['ignored']} ignored pixels")
        for name, count in zip(CLASS_NAMES, stats["pixels_per_class"]):
            print(f"  {name:14s} {count}")
    return 0


def _cmd_arch_import(args: argparse.Namespace) -> int:
    from fasterkd.models.arch_search import import_official_arch

    spec = import_official_arch(args.arch_file, role=args.role, lasts=args.lasts)
    spec.save(args.out)
    print(f"wrote {args.out}: branches {spec.lasts}, {sum(len(b.ops) for b in spec.branches)} layers")
    return 0


def _cmd_arch_show(args: argparse.Namespace) -> int:
    from fasterkd.models.arch import ArchSpec

    spec = ArchSpec.load(args.arch)
    print(json.dumps(spec.to_dict(), indent=1))
    return 0


def _cmd_cost(args: argparse.Namespace) -> int:
    from fasterkd.cost import model_cost
    from fasterkd.models import build_model

    model = build_model(args.model, arch=args.arch, head=args.head, num_classes=args.num_classes)
    size = parse_size(args.input, "--input")
    result = model_cost(model, size)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:18s} {v:,}" if isinstance(v, int) else f"{k:18s} {v}")
    return 0


def _cmd_latency_table(args: argparse.Namespace) -> int:
    from fasterkd.models.latency import measure_latency_table

    from fasterkd.models.latency import parse_ratios

    widths = parse_ratios(args.widths, "--widths")
    stem_head = [tuple(parse_ratios(pair.replace(":", ","), "--stem-head-widths")) for pair in args.stem_head_widths.split(",")]
    if any(len(p) != 2 for p in stem_head):
        raise ValueError(f"--stem-head-widths must look like 1:1,8/12:8/12, got {args.stem_head_widths!r}")
    entries = measure_latency_table(args.out, input_size=parse_size(args.input, "--input"), device=args.device,
                                    repeats=args.repeats, fch=args.fch, width_mult_list=widths,
                                    stem_head_widths=stem_head, warmup=args.warmup)
    print(f"wrote {args.out}: {len(entries)} entries")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasterkd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fasterkd {__import__('fasterkd').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="write or check datasets", epilog=EPILOG_DATA, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    synth = data_sub.add_parser("synth", help="write synthetic street scenes in the Cityscapes layout", epilog=EPILOG_DATA, formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("--out", required=True, type=Path, help="dataset root to write")
    synth.add_argument("--n", type=int, default=100, help="number of scenes")
    synth.add_argument("--size", default="256x512", help="image size HxW")
    synth.add_argument("--seed", type=int, default=0, help="scene seed (same seed, same bytes)")
    synth.add_argument("--split", default="train", help="split folder name")
    synth.set_defaults(func=_cmd_data_synth)
    check = data_sub.add_parser("check", help="read a dataset through the loader and count pixels per class", epilog=EPILOG_DATA, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("root", type=Path, help="dataset root (Cityscapes layout)")
    check.add_argument("--split", default="val")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=_cmd_data_check)

    arch = sub.add_parser("arch", help="import, derive and show architectures", epilog=EPILOG_ARCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    arch_sub = arch.add_subparsers(dest="arch_command", required=True, metavar="ACTION")
    imp = arch_sub.add_parser("import", help="convert an official FasterSeg arch_*.pt into a fasterkd arch JSON", epilog=EPILOG_ARCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("arch_file", type=Path)
    imp.add_argument("--out", required=True, type=Path)
    imp.add_argument("--role", choices=["auto", "student", "teacher"], default="auto", help="teacher = official arch_0 rules (ignore skip, full width)")
    imp.add_argument("--lasts", default="auto", help="branch final rates, e.g. 2,1; auto = the official objective")
    imp.set_defaults(func=_cmd_arch_import)
    show = arch_sub.add_parser("show", help="print an arch JSON")
    show.add_argument("arch", type=Path)
    show.set_defaults(func=_cmd_arch_show)

    cost = sub.add_parser("cost", help="parameters, MACs and FLOPs of a model", epilog=EPILOG_COST, formatter_class=argparse.RawDescriptionHelpFormatter)
    cost.add_argument("--model", default="student", help="student, tutor, supernet, hrnet-w18-small-v1, hrnet-w18-small-v2, hrnet-w18, hrnet-w48, hrnet-w48-ocr")
    cost.add_argument("--arch", type=Path, default=None, help="arch JSON (student/tutor); default: the official FasterSeg student")
    cost.add_argument("--head", choices=["bilinear", "pixel_shuffle"], default="bilinear")
    cost.add_argument("--input", default="1024x2048", help="input size HxW")
    cost.add_argument("--num-classes", type=int, default=19)
    cost.add_argument("--json", action="store_true")
    cost.set_defaults(func=_cmd_cost)

    lat = sub.add_parser("latency-table", help="measure a FasterSeg latency lookup table on this device")
    lat.add_argument("--out", required=True, type=Path, help="JSON file to write")
    lat.add_argument("--input", default="1024x2048", help="network input size HxW")
    lat.add_argument("--device", default="auto")
    lat.add_argument("--repeats", type=int, default=20)
    lat.add_argument("--warmup", type=int, default=3)
    lat.add_argument("--fch", type=int, default=12, help="base channel count Fch of the search space")
    lat.add_argument("--widths", default="4/12,6/12,8/12,10/12,1", help="width ratios of the search space")
    lat.add_argument("--stem-head-widths", default="1:1,8/12:8/12", help="stem:head width of each architecture")
    lat.set_defaults(func=_cmd_latency_table)

    from fasterkd.train import add_train_commands

    add_train_commands(sub)

    from fasterkd.book import add_book_command

    add_book_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # bad input: one clear line, no traceback (set FASTERKD_DEBUG=1 for the traceback)
        import os

        if os.environ.get("FASTERKD_DEBUG"):
            raise
        print(f"fasterkd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

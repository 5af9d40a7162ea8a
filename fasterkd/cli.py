"""The ``fasterkd`` command line: one sub-command per stage of the paper.

Each handler parses flags, calls the library and prints; no logic lives here (tests/test_structure.py
holds it to that). The book runner's parser is :func:`fasterkd.book.add_book_command`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fasterkd.config import OVERRIDES, PROFILES, STAGES
from fasterkd.utils import parse_size

# fasterkd.backends.BACKENDS, spelled here so that parsing needs no torch import (a test keeps them equal)
BACKENDS = ("auto", "torch", "onnxruntime")
BACKEND_HELP = ("auto (default): onnxruntime on CPU when installed, else torch | torch: BN-folded eager "
                "channels_last | onnxruntime")

if TYPE_CHECKING:
    from fasterkd.config import TrainConfig
    from fasterkd.engine.trainer import StageResult

EPILOG_TRAIN = """examples (the quick chain; a search's arch.json is the student of every later stage):
  fasterkd train teacher  --profile quick --out runs/teacher
  fasterkd search         --profile quick --teacher runs/teacher/best.pt --out runs/search
  fasterkd train baseline --profile quick --teacher runs/teacher/best.pt --arch runs/search/arch.json --out runs/baseline
  fasterkd train tutor    --profile quick --teacher runs/teacher/best.pt --arch runs/search/arch.json --init runs/baseline/best.pt --out runs/tutor
  fasterkd train student  --profile quick --tutor runs/tutor/best.pt --arch runs/search/arch.json --init runs/baseline/best.pt --fa-weight 1 --out runs/student
  fasterkd train head     --profile quick --teacher runs/teacher/best.pt --arch runs/search/arch.json --init runs/baseline/best.pt --out runs/head
  fasterkd train baseline --config my.yaml --resume          # continue a killed run (YAML/JSON: preset names or dotted paths)
  fasterkd train baseline --profile smoke --set optim.lr=0.005 --set loss.ohem=false
  torchrun --nproc_per_node 4 -m fasterkd train baseline --profile paper --data-root data/cityscapes --teacher hrnet_w48.pth
"""
EPILOG_SEARCH = """examples:
  fasterkd search --profile quick --teacher runs/teacher/best.pt --out runs/search
  fasterkd search --profile paper --data-root data/cityscapes --teacher hrnet_w48.pth --latency-table official
  fasterkd latency-table --out lut.json --input 512x1024 && fasterkd search --latency-table lut.json
"""
EPILOG_EVAL = """examples:
  fasterkd eval runs/student/best.pt --json runs/student/val.json
  fasterkd eval runs/student/best.pt --data-root data/cityscapes --split val --device cuda
"""
EPILOG_PREDICT = """examples:
  fasterkd predict runs/student/best.pt frame1.png frame2.jpg --out predictions/
  fasterkd predict runs/student/best.pt data/frames/ --out predictions/   # every image under the folder
outputs: <stem>_pred.png and <stem>_overlay.png; inputs that share a stem are named by their
relative path with the suffix (a/frame.png -> a__frame_png_pred.png, odd.jpg -> odd_jpg_pred.png)
"""
EPILOG_EXPORT = """examples:
  fasterkd export runs/student/best.pt --format onnx --out student.onnx --input 1024x2048
"""


EPILOG_DATA = """examples:
  fasterkd data synth --out data/synth --n 200 --size 256x512 --split train
  fasterkd data check data/synth --split train --json
"""
EPILOG_ARCH = """examples:
  fasterkd arch import ../shared/reference/fasterseg/arch_1.pt --out student.json
  fasterkd arch show student.json
"""
EPILOG_WEIGHTS = """examples (official FasterSeg weights*.pt <-> fasterkd checkpoints):
  fasterkd weights import weights1.pt --out runs/official/best.pt --arch student.json
  fasterkd eval runs/official/best.pt --data-root data/cityscapes
  fasterkd train baseline --profile paper --init weights1.pt --arch student.json --teacher hrnet_w48.pth
  fasterkd weights export runs/baseline/best.pt --out weights1.pt
"""
EPILOG_COST = """examples:
  fasterkd cost --model student --arch student.json --head bilinear --input 1024x2048 --json
  fasterkd cost --model hrnet-w48-ocr --input 1024x2048
"""


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from fasterkd.data.synthetic import write_synthetic

    n = write_synthetic(args.out, n=args.n, size=parse_size(args.size, "--size"), seed=args.seed, split=args.split,
                        force=args.force)
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


def _cmd_weights_import(args: argparse.Namespace) -> int:
    from fasterkd.engine.checkpoint import import_official_weights

    out = import_official_weights(args.weights, args.out, arch=args.arch, profile=args.profile)
    print(f"wrote {out} (official FasterSeg weights from {args.weights})")
    return 0


def _cmd_weights_export(args: argparse.Namespace) -> int:
    from fasterkd.engine.checkpoint import export_official_weights

    out = export_official_weights(args.checkpoint, args.out)
    print(f"wrote {out} (official FasterSeg names)")
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


def _parse_train_config(stage: str, args: argparse.Namespace) -> "TrainConfig":
    """Profile preset <- ``--config`` file <- command-line flags (``--set KEY=VALUE``: typed values)."""
    from fasterkd.config import layered_config
    from fasterkd.overrides import parse_set

    flags = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name, None) is not None}
    for dotted in args.set or []:
        k, v = parse_set(dotted)  # the raw string: the config parses it to the field's type
        flags[k] = v
    if "crop" in flags and isinstance(flags["crop"], str):
        flags["crop"] = parse_size(flags["crop"], "--crop")
    return layered_config(stage, args.profile, args.config, flags)


def _print_result(result: StageResult) -> None:
    ev = result.eval
    if ev and "miou" in ev:
        print(f"final mIoU {ev['miou']:.4f}, pixel acc {ev['pixel_acc']:.4f} on {ev['images']} images")
    elif ev:  # the search: the derived student of the last epoch
        miou = ev.get("val_miou")
        print(f"derived branches {ev['lasts']}: LUT latency {ev['latency_ms']:.3f} ms ({ev['fps']:.1f} FPS), "
              f"supernet mIoU {'n/a' if miou is None else f'{miou:.4f}'}")
    print(f"wrote {result.out_dir} (last.pt, best.pt, metrics.csv, eval.json)")
    if result.arch is not None:
        print(f"derived arch: {result.arch}")


def _cmd_train(args: argparse.Namespace) -> int:
    from fasterkd.train import run_stage

    _print_result(run_stage(_parse_train_config(args.stage, args), resume=args.resume, overwrite=args.overwrite))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from fasterkd.train import run_stage

    _print_result(run_stage(_parse_train_config("search", args), resume=args.resume, overwrite=args.overwrite))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fasterkd.data.cityscapes import CLASS_NAMES
    from fasterkd.inference import evaluate_checkpoint
    from fasterkd.utils import atomic_write_json

    result = evaluate_checkpoint(args.checkpoint, args.device, args.data_root, args.split, args.max_images,
                                 args.backend)
    if args.json:
        atomic_write_json(args.json, result)
    print(f"mIoU {result['miou']:.4f}  pixel acc {result['pixel_acc']:.4f}  ({result['images']} images)")
    for name, iou in zip(CLASS_NAMES, result["iou"]):
        print(f"  {name:14s} {iou:.4f}" if iou is not None and iou == iou else f"  {name:14s} n/a")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fasterkd.inference import predict_checkpoint

    written = predict_checkpoint(args.checkpoint, [Path(p) for p in args.images], Path(args.out), args.device,
                                 args.backend)
    print(f"wrote {len(written)} files to {args.out}")
    for path in written:
        print(f"  {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fasterkd.inference import export_checkpoint

    if args.format != "onnx":
        raise ValueError(f"--format must be onnx, got {args.format!r}")
    out, info = export_checkpoint(args.checkpoint, args.out, parse_size(args.input, "--input"), opset=args.opset)
    print(f"wrote {out}; onnxruntime vs torch max abs difference {info['max_abs_diff']:.3e} "
          f"relative {info['max_rel_diff']:.3e} (output {info['output_shape']})")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON file of options (preset names or dotted paths)")
    p.add_argument("--profile", choices=PROFILES, default=None, help="smoke | quick (default) | study | paper")
    p.add_argument("--data-root", dest="data_root", default=None, help="Cityscapes-layout root; '' = synthetic")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--out", dest="out_dir", default=None, help="output folder")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--crop", default=None, help="training crop HxW")
    p.add_argument("--teacher", default=None, help="HRNet teacher checkpoint (teacher run or official file)")
    p.add_argument("--teacher-model", dest="teacher_model", default=None, help="HRNet name of an official file")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--workers", dest="num_workers", type=int, default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field, e.g. --set optim.lr=0.005")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="continue from OUT/last.pt (or a given checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT (else refused unless --resume)")


def _add_train_commands(sub: "argparse._SubParsersAction") -> None:
    """Register ``train``, ``search``, ``eval``, ``predict`` and ``export`` on the fasterkd CLI."""
    fmt = argparse.RawDescriptionHelpFormatter
    train = sub.add_parser("train", help="train one stage (teacher, baseline, tutor, student, head)",
                           epilog=EPILOG_TRAIN, formatter_class=fmt)
    train.add_argument("stage", choices=[s for s in STAGES if s != "search"])
    _add_common(train)
    train.add_argument("--tutor", default=None, help="tutor checkpoint (student stage)")
    train.add_argument("--init", default=None, help="baseline student checkpoint (or official FasterSeg weights) to start from")
    train.add_argument("--arch", default=None, help="arch JSON (e.g. a search's arch.json)")
    train.add_argument("--head", choices=["bilinear", "pixel_shuffle"], default=None)
    train.add_argument("--fa-weight", dest="fa_weight", type=float, default=None, help="c of Eq. 10")
    train.add_argument("--fa-convnorm", dest="fa_convnorm", action="store_true", default=None)
    train.add_argument("--quarter-depth", dest="quarter_depth", type=int, default=None)
    train.add_argument("--kd-weight", dest="kd_weight", type=float, default=None)
    train.set_defaults(func=_cmd_train)

    search = sub.add_parser("search", help="teacher-guided architecture search (Eq. 7)", epilog=EPILOG_SEARCH,
                            formatter_class=fmt)
    _add_common(search)
    search.add_argument("--pretrain-epochs", dest="pretrain_epochs", type=int, default=None)
    search.add_argument("--latency-table", dest="latency_table", default=None, help="official or a JSON table")
    search.add_argument("--latency-weight", dest="latency_weight", type=float, default=None, help="lambda1 of Eq. 7")
    search.add_argument("--kd-weight", dest="kd_weight", type=float, default=None,
                        help="lambda2 of Eq. 7 (0: FasterSeg's objective without HRNet)")
    search.set_defaults(func=_cmd_search)

    ev = sub.add_parser("eval", help="mIoU and per-class IoU at full resolution", epilog=EPILOG_EVAL,
                        formatter_class=fmt)
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--data-root", dest="data_root", default=None, help="default: the checkpoint's data")
    ev.add_argument("--split", default=None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--max-images", dest="max_images", type=int, default=None)
    ev.add_argument("--json", type=Path, default=None, help="write the result here")
    ev.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    ev.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("predict", help="colour-coded predictions and overlays of images", epilog=EPILOG_PREDICT,
                        formatter_class=fmt)
    pr.add_argument("checkpoint", type=Path)
    pr.add_argument("images", nargs="+", help="image files or folders (every image under a folder, sorted)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser("export", help="export a checkpoint to ONNX (checked with onnxruntime)", epilog=EPILOG_EXPORT,
                        formatter_class=fmt)
    ex.add_argument("checkpoint", type=Path)
    ex.add_argument("--format", default="onnx", choices=["onnx"])
    ex.add_argument("--out", default=None)
    ex.add_argument("--input", default="256x512", help="input size HxW of the exported graph")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (torch.onnx's TorchScript exporter: 7 to 20)")
    ex.set_defaults(func=_cmd_export)


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
    synth.add_argument("--force", action="store_true", help="write even into a folder that holds other data")
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

    wts = sub.add_parser("weights", help="official FasterSeg weights in and out", epilog=EPILOG_WEIGHTS,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    wts_sub = wts.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wimp = wts_sub.add_parser("import", help="an official weights*.pt as a fasterkd checkpoint", epilog=EPILOG_WEIGHTS,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    wimp.add_argument("weights", type=Path, help="state dict saved by the official train.py")
    wimp.add_argument("--out", required=True, type=Path, help="checkpoint to write, e.g. runs/official/best.pt")
    wimp.add_argument("--arch", type=Path, default=None, help="arch JSON of the weights; default: the official student/teacher by stem width")
    wimp.add_argument("--profile", choices=PROFILES, default="paper", help="profile of the recorded config (data, eval)")
    wimp.set_defaults(func=_cmd_weights_import)
    wexp = wts_sub.add_parser("export", help="a fasterkd student checkpoint under the official names", epilog=EPILOG_WEIGHTS,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    wexp.add_argument("checkpoint", type=Path)
    wexp.add_argument("--out", required=True, type=Path, help="weights file to write, e.g. weights1.pt")
    wexp.set_defaults(func=_cmd_weights_export)

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

    _add_train_commands(sub)

    from fasterkd.book import add_book_command

    add_book_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fasterkd.errors import USER_ERRORS, describe_error

    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        # bad input or a failed read/write: one clear line, no traceback (FASTERKD_DEBUG=1 for it)
        import os

        if os.environ.get("FASTERKD_DEBUG"):
            raise
        print(f"fasterkd {args.command}: error: {describe_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # RunInterrupted (a resumable stop) or a second Ctrl-C
        print(f"fasterkd {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))


if __name__ == "__main__":
    sys.exit(main())

"""`onnx-whc`: a thin click layer over the Python API.

Exit codes: 0 success, 1 the pruned model failed validation, 2 bad input or usage.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import __version__
from .api import DEFAULT_ROUND_TO, QualityFloor, Settings, SpeedTarget
from .api import analyze as analyze_model
from .api import distill as distill_models
from .api import prune as prune_model
from .api import sweep as sweep_model
from .data.calibration import PRESETS, preset_preprocess
from .data.views import MIXES, Augment
from .errors import OnnxWhcError, UserInputError
from .graph.storage import check_writable, copy_unchanged, external_data_files, same_file, save
from .pipeline import CRITERION_NAMES
from .recovery.distill import PARAMETERS, DistillSettings, parse_duration
from .recovery.recover import METHODS, RecoverySettings
from .reports.bench import compare, parse_batches
from .reports.plot import distill_curve


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for value in values:
        name, sep, dims = value.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise UserInputError(f"--input-shape '{value}' is not NAME:DxDxD (e.g. input:1x3x224x224)")
        shapes[name] = shape
    return shapes


def parse_triple(option: str, value: str) -> tuple[float, float, float]:
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise UserInputError(f"{option} '{value}' is not three comma-separated numbers (e.g. 0.485,0.456,0.406)")
    return numbers


_CALIBRATION_OPTIONS = [
    click.option("--calib", type=click.Path(), help="Calibration data for recovery and --allocate: a folder of "
                 "images, an .npy (N x C x H x W float32, used as-is) or an .npz keyed by input name."),
    click.option("--calib-size", type=int, default=1000, show_default=True,
                 help="Calibration samples used: a seeded random subset of a folder, the first rows of an array."),
    click.option("--calib-preset", type=click.Choice(["none", *PRESETS]), default="none", show_default=True,
                 help="Preprocessing of common model families, for --calib images and the built-in synthetic "
                 "ones: imagenet (ImageNet mean/std, resize to size/0.875, centre crop), inception (mean = std "
                 "= 0.5, same crop: TF/Keras, EfficientNet-Lite), cifar (CIFAR-10 mean/std), unit (x/255 only), "
                 "yolo (x/255, letterboxed on grey 114). --mean/--std/--resize/--crop override it."),
    click.option("--mean", metavar="M,M,M", help="Per-channel RGB mean subtracted from images scaled to [0, 1].  "
                 "[default: the preset's, else 0.485,0.456,0.406]"),
    click.option("--std", metavar="S,S,S", help="Per-channel RGB std divided by.  "
                 "[default: the preset's, else 0.229,0.224,0.225]"),
    click.option("--synthetic/--no-synthetic", default=True, show_default=True,
                 help="Without --calib, recover and measure on built-in synthetic dead-leaves images when the "
                 "model takes images (refined by model inversion for classifiers of 64 px or more)."),
    click.option("--resize", type=int, help="Scale images' short side to this many pixels (bilinear). "
                 "Without --resize/--crop, images are resized to the model's input size."),
    click.option("--crop", type=int, help="Centre-crop a square of this size (after --resize)."),
    click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True,
                 help="Layout of the model's image input."),
    click.option("--eval", "eval_set", type=click.Path(exists=True),
                 help="Labelled images for top-1 before and after: a folder of class folders (ImageNet style, "
                 "classes in sorted order) or a CSV with file,label columns (rows of a 'split' column other than "
                 "eval/val/test are skipped)."),
    click.option("--recover", "recover", type=click.Choice(METHODS), default="auto", show_default=True,
                 help="Post-pruning recovery without training. auto: lsq with calibration data (--calib, or "
                 "the built-in synthetic images), none without; "
                 "lsq: per-layer least squares against the original's outputs; stats: match output mean/std; "
                 "bias: data-free bias compensation."),
    click.option("--allocate/--no-allocate", default=None,
                 help="Spend the MACs budget of --ratio/--target-macs per group where calibration shows the "
                 "least damage, instead of one uniform ratio.  [default: on with calibration data, unless "
                 "--recover none without --calib]"),
    click.option("--recover-samples", type=int, default=RecoverySettings.samples, show_default=True,
                 help="Sampled output positions per layer for lsq/stats, at least: a layer gets 100 per input "
                      "of its map, up to 4x this (memory and time grow with it)."),
    click.option("--memory", metavar="SIZE", help="Memory the passes over calibration data may hold, e.g. 4G or "
                 "500M: they hold as many samples at once as it allows.  [default: a quarter of the memory "
                 "available at the start]"),
]

_DISTILL_OPTIONS = [
    click.option("--distill-steps", type=click.IntRange(min=1), metavar="N",
                 help="Distil for N steps (with --distill/--time: whichever ends first)."),
    click.option("--distill-batch", type=click.IntRange(min=2), metavar="B",
                 help="Augmented views per step.  [default: 64 for 32x32 inputs, 16 at 224x224, 8 at 320x320]"),
    click.option("--distill-parameters", type=click.Choice(PARAMETERS), default="all", show_default=True,
                 help="all: every kept weight and bias; affine: one scale per filter and the biases."),
    click.option("--distill-synthetic", is_flag=True,
                 help="Also train on the built-in synthetic images (refined by inverting the model where it can "
                      "be), beside the --calib images."),
    click.option("--distill-lr", type=click.FloatRange(min=0, min_open=True), default=DistillSettings.lr,
                 show_default=True, metavar="LR",
                 help="Adam's peak step, as a share of the RMS of each filter's original weights."),
    click.option("--distill-mix", type=click.Choice(("auto", *MIXES)), default="auto", show_default=True,
                 help="How two images of a batch make one view: cutmix pastes a box of one into the other, "
                      "mixup takes their weighted sum; auto: cutmix for a classifier, mixup for other outputs."),
    click.option("--distill-average", type=click.FloatRange(0, 1), default=DistillSettings.average,
                 show_default=True, metavar="SHARE",
                 help="Check and return the weights' moving average over about this share of the steps "
                      "(0: the weights as trained)."),
    click.option("--distill-features", type=click.FloatRange(min=0), default=DistillSettings.features,
                 show_default=True, metavar="WEIGHT",
                 help="Weight of a term on the feature maps the model's global pooling reads, where the prune "
                      "left their shape (0: the outputs alone)."),
    click.option("--distill-scale", type=click.FloatRange(0, 1, min_open=True), default=DistillSettings.scale,
                 show_default=True, metavar="SHARE",
                 help="Train on views this share of the input's height and width (multiples of 32 where the "
                      "input's are): cheaper steps, more of them; the model is checked and written at its size."),
    click.option("--distill-sigmoid-logits/--no-distill-sigmoid-logits", default=DistillSettings.sigmoid_logits,
                 show_default=True,
                 help="Match Sigmoid scores in an output (a detector's class scores) on their logits by the "
                      "binary KL divergence, instead of the squared error of the probabilities."),
]


def _distill_options(command):
    for option in reversed(_DISTILL_OPTIONS):
        command = option(command)
    return command


def _distill_settings(duration, seed, provider, distill_steps, distill_batch, distill_parameters, distill_synthetic,
                      distill_lr, distill_mix, distill_average, distill_features, distill_scale,
                      distill_sigmoid_logits) -> DistillSettings | None:
    """The settings of the --distill-* options (passed on by name), or None when no budget is given."""
    if duration is None and distill_steps is None:
        return None
    try:
        seconds = parse_duration(duration) if duration is not None else None
    except ValueError as err:
        raise UserInputError(f"--distill/--time: {err}") from None
    if seconds is not None and seconds <= 0:
        raise UserInputError("--distill/--time must be a positive duration, e.g. 15m")
    augment = None if distill_mix == "auto" else Augment(mix=distill_mix)  # None: by the output's kind
    return DistillSettings(seconds=seconds, steps=distill_steps, batch=distill_batch, parameters=distill_parameters,
                           synthetic=distill_synthetic, lr=distill_lr, augment=augment, average=distill_average,
                           features=distill_features, scale=distill_scale, sigmoid_logits=distill_sigmoid_logits,
                           seed=seed, provider=provider)


def _calibration_options(command):
    for option in reversed(_CALIBRATION_OPTIONS):
        command = option(command)
    return command


class _Command(click.Command):
    """Turn every expected failure into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OnnxWhcError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)
        except MemoryError:
            click.echo("error: out of memory", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            ctx.exit(130)
        except OSError as err:  # the disk, not the model: full, read-only, vanished
            click.echo(f"error: {err.filename or 'a file'}: {err.strerror or err}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as err:  # a bug: still one line, the traceback on request
            if os.environ.get("ONNX_WHC_TRACEBACK"):
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            click.echo(f"error: internal error ({type(err).__name__}: {first}); please report it "
                       "(set ONNX_WHC_TRACEBACK=1 to see where it happened)", err=True)
            ctx.exit(3)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-whc")
def main():
    """Prune whole convolution filters of an ONNX model with the Weighted Hybrid Criterion."""


_input_shape = click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:1x3x224x224",
                            help="Fix dynamic input dimensions (repeat for several inputs).")


@main.command(cls=_Command)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--ratio", "-r", metavar="R",
              help="Share of channels removed from every group, in [0, 1).  [default: 0.4]")
@click.option("--target-macs", metavar="F",
              help="Instead of --ratio: prune until at most this share of MACs is left, in (0, 1].")
@click.option("--min-agreement", type=float, metavar="A",
              help="Instead of a budget: prune as far as the recovered model keeps at least this top-1 agreement "
              "with the original on held-out samples (classifier outputs).")
@click.option("--min-r2", type=float, metavar="R",
              help="Like --min-agreement, for dense outputs: mean per-channel explained variance at least R.")
@click.option("--target-speedup", type=float, metavar="X",
              help="Instead of a budget: prune until the model is measured X times faster than the original "
              "(on --provider, at --batch, with --threads), the mildest plan that is.")
@click.option("--target-latency", type=float, metavar="MS",
              help="Like --target-speedup, for a latency in milliseconds.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size the speed target is measured at.")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads for the speed target (default: one per core).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Where to write the pruned model.")
@click.option("--criterion", "-c", type=click.Choice(CRITERION_NAMES), default="auto",
              show_default=True, help="Filter score. auto: energy when calibration data drives the prune, else whc. whc+ weighs WHC by the norm "
              "of the consumers' weights; energy (needs --calib) by the output variance each channel carries.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Keep the filters of nodes whose name matches (repeatable).")
@click.option("--round-to", metavar="N|measured",
              help="Kept channel counts become multiples of N (1: exactly the ratio; see benchmarks/results/speed.md), "
              "or with 'measured' the widths at which each layer is timed faster on --provider (cached on disk). "
              f"Default: {DEFAULT_ROUND_TO}, measured with a speed target.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the full JSON report here.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime checks and latency measurement.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random criterion.")
@click.option("--provider", help="ONNX Runtime provider for validation (cuda or cpu; default: the best available).")
@click.option("--distill", "distill", metavar="TIME",
              help="After recovery, train the pruned model towards the original on augmented views of the "
              "calibration images for at most TIME (e.g. 15m, 1h, 90s), on --provider; the held-out samples "
              "choose the checkpoint, never worse than the start.")
@_distill_options
@_input_shape
@_calibration_options
def prune(model, ratio, target_macs, min_agreement, min_r2, target_speedup, target_latency, batch, threads, output,
          criterion, exclude, round_to, report_path, no_validate, seed, provider, distill, input_shape, calib,
          calib_size, calib_preset, mean, std, synthetic, resize, crop, layout, eval_set, recover, allocate,
          recover_samples, memory, **distill_options):
    """Remove the lowest-scoring filters of every prunable channel group."""
    if output and same_file(model, output):
        raise UserInputError("-o is the input file: choose another path (the input is never overwritten)")
    for data in external_data_files(model) if output and os.path.isfile(model) else ():
        if same_file(data, output) or same_file(data, output + ".data"):  # .data: where large outputs keep weights
            raise UserInputError(f"-o {output} would overwrite the input's weights in {data}: choose another path")
    for option, path in (("-o", output), ("--report", report_path)):
        if path:
            check_writable(option, path)  # before the work, not after it
    settings = _settings(seed, provider, input_shape, calib, calib_size, calib_preset, mean, std, synthetic, resize,
                         crop, layout, eval_set, recover, allocate, recover_samples, memory, criterion, exclude,
                         round_to).but(
        ratio=ratio, target_macs=target_macs, validate=not no_validate, floor=QualityFloor(min_agreement, min_r2),
        distill=_distill_settings(distill, seed, provider, **distill_options),
        speed=None if target_speedup is None and target_latency is None else
        SpeedTarget(target_speedup, target_latency, batch, threads))
    pruned, report = prune_model(model, settings=settings)
    removed = report.removed_channels
    click.echo(report.summary())
    for line in (report.warning, report.caveat):
        if line:
            click.echo(line, err=True)
    if report_path:
        _write_text(report_path, report.to_json())
        if report.distill:
            _write_curve(report_path, report.distill)
    if removed == 0:
        done = "nothing written (no -o given)"
        if output:
            copy_unchanged(model, output)  # the input's own bytes, not a re-export
            done = f"copied the input unchanged (byte-identical) to {output}"
        click.echo(f"nothing to prune: {_why_nothing(report)}; {done}")
    elif not output:
        click.echo("no -o given: nothing written", err=True)
    else:
        save(pruned, output)
        click.echo(f"wrote {output}")


@main.command(cls=_Command)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--budgets", default="0.9,0.8,0.7,0.6,0.5", show_default=True, metavar="F,F,...",
              help="Shares of the MACs to keep, comma-separated.")
@click.option("--output", "-o", "prefix", default="sweep", show_default=True, metavar="PREFIX",
              help="Writes PREFIX.md, PREFIX.json and PREFIX.png (quality against MACs kept and latency).")
@click.option("--criterion", "-c", type=click.Choice(CRITERION_NAMES), default="auto", show_default=True)
@click.option("--exclude", multiple=True, metavar="GLOB", help="Keep the filters of nodes whose name matches.")
@click.option("--round-to", metavar="N|measured", help=f"As for prune (default {DEFAULT_ROUND_TO}).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--provider", help="ONNX Runtime provider for the latency (cuda or cpu; default: the best available).")
@_input_shape
@_calibration_options
def sweep(model, budgets, prefix, criterion, exclude, round_to, seed, provider, input_shape, calib, calib_size,
          calib_preset, mean, std, synthetic, resize, crop, layout, eval_set, recover, allocate, recover_samples, memory):
    """Prune at several MACs budgets and tabulate quality, latency and top-1, with a plot."""
    for suffix in (".md", ".json", ".png"):
        check_writable("-o", prefix + suffix)
    settings = _settings(seed, provider, input_shape, calib, calib_size, calib_preset, mean, std, synthetic, resize,
                         crop, layout, eval_set, recover, allocate, recover_samples, memory, criterion, exclude,
                         round_to)
    result = sweep_model(model, [b for b in budgets.split(",") if b.strip()], settings=settings)
    markdown = result.to_markdown()
    click.echo(markdown)
    _write_text(prefix + ".md", markdown, "-o")
    _write_text(prefix + ".json", json.dumps(result.to_dict(), indent=2), "-o")
    result.plot(prefix + ".png.tmp")  # written whole, then moved into place
    os.replace(prefix + ".png.tmp", prefix + ".png")
    click.echo(f"wrote {prefix}.md, {prefix}.json and {prefix}.png")


def _settings(seed, provider, input_shape, calib, calib_size, calib_preset, mean, std, synthetic, resize, crop, layout,
              eval_set, recover, allocate, recover_samples, memory, criterion, exclude, round_to) -> Settings:
    """The options `prune` and `sweep` share, as the one settings object the API reads."""
    return Settings(criterion=criterion, exclude=exclude, round_to=round_to, seed=seed,
                    input_shapes=parse_input_shapes(input_shape), calib=calib, calib_size=calib_size,
                    preprocess=_preprocess(calib_preset, mean, std, resize, crop, layout), synthetic=synthetic,
                    eval_set=eval_set, recover=recover, allocate=allocate,
                    recovery_settings=RecoverySettings(samples=recover_samples), memory=memory, provider=provider,
                    progress=True)


def _preprocess(preset, mean, std, resize, crop, layout):
    return preset_preprocess(preset, layout, mean and parse_triple("--mean", mean), std and parse_triple("--std", std),
                             resize, crop)


def _why_nothing(report) -> str:
    if not report.groups:
        return "the model has no Conv, Gemm or MatMul filters to remove"
    fixed = [g for g in report.groups if not g.prunable]
    if len(fixed) == len(report.groups):
        return f"no channel group can be pruned (group {fixed[0].id}: {fixed[0].reasons[0]})"
    return f"ratio {report.ratio:g} removes no whole channel from any prunable group"


@main.command(cls=_Command)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@_input_shape
def analyze(model, as_json, input_shape):
    """Show the channel groups: members, width, share of MACs, and why a group cannot be pruned."""
    report = analyze_model(model, parse_input_shapes(input_shape))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())


@main.command(cls=_Command)
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("pruned", type=click.Path(dir_okay=False))
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per model and batch size.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs first, per model and batch size.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"], case_sensitive=False),
              help="ONNX Runtime provider (default: CUDA when it really works, else CPU).")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads (default: one per physical core).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
@click.option("--layers", type=click.IntRange(min=0), default=0, metavar="N",
              help="Also profile both models at the first batch size and show the N slowest nodes, before and after.")
@_input_shape
def bench(original, pruned, batches, runs, warmup, provider, threads, json_path, layers, input_shape):
    """Compare the latency of ORIGINAL and PRUNED side by side, against the speedup their MACs promise."""
    result = compare(original, pruned, parse_batches(batches), provider, runs, warmup, progress=True,
                     input_shapes=parse_input_shapes(input_shape), threads=threads, layers=layers)
    click.echo(result.summary())
    if json_path:
        _write_text(json_path, result.to_json(), "--json")


def _write_curve(report_path: str, distilled: dict) -> None:
    """The distillation's held-out curve as a PNG beside the JSON report, written whole then moved into place."""
    path = os.path.splitext(report_path)[0] + ".distill.png"
    distill_curve(distilled, path + ".tmp")
    os.replace(path + ".tmp", path)
    click.echo(f"wrote {path}", err=True)


@main.command(cls=_Command)
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("pruned", type=click.Path(dir_okay=False))
@click.option("--time", "duration", metavar="TIME", help="Train for at most TIME (e.g. 15m, 1h, 90s).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="Where to write the model.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report (and the "
              "curve as .distill.png beside it) here.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--provider", help="ONNX Runtime provider to train on (cuda or cpu; default: the best available).")
@_distill_options
@_input_shape
@_calibration_options
def distill(original, pruned, duration, output, report_path, seed, provider, input_shape, calib, calib_size,
            calib_preset, mean, std, synthetic, resize, crop, layout, eval_set, recover, allocate, recover_samples,
            memory, **distill_options):
    """Heal a model pruned earlier: train PRUNED towards ORIGINAL on augmented views of --calib images.

    PRUNED keeps its graph; only its weights change. Any model with ORIGINAL's inputs and outputs will do.
    """
    for path in (p for p in (original, pruned) if same_file(p, output)):
        raise UserInputError(f"-o is the input file {path}: choose another path (the input is never overwritten)")
    for option, path in (("-o", output), ("--report", report_path)):
        if path:
            check_writable(option, path)
    settings = _distill_settings(duration, seed, provider, **distill_options)
    if settings is None:
        raise UserInputError("give --time (e.g. 15m) or --distill-steps")
    options = _settings(seed, provider, input_shape, calib, calib_size, calib_preset, mean, std, synthetic, resize,
                        crop, layout, eval_set, recover, allocate, recover_samples, memory, "auto", (), None)
    model, report = distill_models(original, pruned, settings=options.but(distill=settings))
    click.echo(f"distill: {report.summary()}")
    if report_path:
        _write_text(report_path, json.dumps(report.to_dict(), indent=2))
        _write_curve(report_path, report.to_dict())
    save(model, output)
    click.echo(f"wrote {output}")


def _write_text(path: str, text: str, option: str = "--report") -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserInputError(f"{option} {path}: folder {folder} does not exist")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())

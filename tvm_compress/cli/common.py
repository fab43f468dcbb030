"""What the commands share: console output, ``--json``, the MODEL argument, quantization options."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tvm_compress.errors import UserError

MODEL_HELP = "an ONNX file path or zoo:NAME (see `tvm-compress inspect --list`)"


class Console:
    """Human output on stderr/stdout via rich; silent when --json is given (JSON goes to stdout)."""

    def __init__(self, json_mode: bool) -> None:
        from rich.console import Console as RichConsole

        self.json_mode = json_mode
        self.out = RichConsole(stderr=json_mode, quiet=json_mode)
        self.err = RichConsole(stderr=True)
        self.stage: str | None = None  # the step running now: named by an internal failure

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.stage = text
        start = time.perf_counter()
        with self.err.status(text):
            yield
        if not self.json_mode:
            self.err.print(f"[green]done[/green] {text} ({time.perf_counter() - start:.1f} s)")

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        from rich.table import Table

        table = Table(title=title)
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*[_fmt(v) for v in row])
        self.out.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _emit_json(obj: dict[str, Any]) -> None:
    from tvm_compress.plan import json_default

    print(json.dumps(obj, default=json_default, allow_nan=True))


def load_model(args: argparse.Namespace) -> Any:
    from tvm_compress.frontend.loader import load_from_args

    return load_from_args(args)


def reference_outputs(model: Any, images: Any) -> tuple[str, Any]:
    """Outputs of the source framework (PyTorch, else ONNX Runtime) for fidelity checks: an
    array, or a list of arrays for a model with several outputs."""
    if model.torch_module is not None:
        import torch

        with torch.inference_mode():
            outs = [model.torch_module(torch.from_numpy(images[i:i + 256])).numpy()
                    for i in range(0, len(images), 256)]
        return "pytorch", np.concatenate(outs)
    from tvm_compress.backend.targets import host_cores
    from tvm_compress.frontend.inputs import as_feed, batches, gather_outputs
    from tvm_compress.runtime.bench import onnxruntime_session

    session = onnxruntime_session(model.onnx_model, threads=host_cores())
    batch = model.input_shape[0]
    chunks = [(session.run(None, chunk), n)
              for chunk, n in batches(as_feed(images, model.inputs), batch)]
    outs = gather_outputs(chunks, batch)
    return "onnxruntime", outs[0] if len(outs) == 1 else outs


def model_io(model: Any) -> dict[str, Any]:
    """The ``input`` (first), ``inputs`` and ``outputs`` entries of a command's JSON."""
    inputs = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in model.inputs]
    return {"input": inputs[0], "inputs": inputs, "outputs": list(model.outputs)}


def npz_samples(path_text: str, what: str, model: Any) -> tuple[Any, np.ndarray | None]:
    """Samples for ``model`` from an .npz: one array per input name (a single-input model may
    use 'images'), optional 'labels'; shapes and dtypes are checked."""
    from tvm_compress.frontend.inputs import check_samples

    path = Path(path_text)
    specs = model.inputs
    if not path.is_file():
        raise UserError(f"{what} file not found: {path} (an .npz with one array per input name "
                        "- or 'images' for a single-input model - and optionally 'labels')")
    with np.load(path) as npz:
        names = [s.name for s in specs]
        if all(n in npz for n in names):
            data: Any = {s.name: npz[s.name].astype(s.dtype) for s in specs}
        elif len(specs) == 1 and "images" in npz:
            data = {names[0]: npz["images"].astype(specs[0].dtype)}
        elif len(specs) == 1:
            raise UserError(f"{path} has no 'images' array (nor '{names[0]}'); save it with "
                            "np.savez(path, images=..., labels=...)")
        else:
            missing = [n for n in names if n not in npz]
            raise UserError(f"{path} lacks array(s) {', '.join(missing)}: a model with several "
                            f"inputs needs one array per input name ({', '.join(names)}), "
                            "e.g. np.savez(path, **{name: array})")
        labels = npz["labels"] if "labels" in npz else None
    feed = check_samples(data, specs, what)
    return (feed[names[0]] if len(specs) == 1 else feed), labels


def split_holdout(calib: Any, calib_samples: int) -> tuple[Any, Any, str]:
    """Calibration samples and held-out evaluation samples from one set: the first
    ``calib_samples`` calibrate and the rest evaluate, or a quarter is held out if that leaves
    nothing to evaluate on."""
    from tvm_compress.frontend.inputs import num_samples, take

    n = num_samples(calib)
    if n < 2:
        raise UserError("--calib has 1 sample: give more samples (some are held out to measure "
                        "agreement with fp32) or a separate --val file")
    used = calib_samples if n > calib_samples else n - max(1, n // 4)
    return (take(calib, 0, used), take(calib, used),
            f"calibrated on samples 0-{used - 1} of --calib, evaluated on the {n - used} "
            "held-out samples")



def _print_bench(con: Console, result: dict[str, Any]) -> None:
    rows = []
    for runtime in ("tvm", "onnxruntime", "pytorch"):
        if runtime in result:
            rows.append([runtime, result[runtime]["median_ms"],
                         result["ratio_to_onnxruntime"][runtime]])
    con.table(f"latency of {result['model']} {result['input_shape']} on {result['threads']} "
              "threads", ["runtime", "median ms", "x ONNX Runtime"], rows)


_STAGES = {"importing": "import", "compiling": "build", "quantizing": "quantize",
           "evaluating": "evaluate", "benchmarking": "bench", "writing": "export",
           "calibrating": "calibrate", "tuning": "tune"}


def log_dir() -> Path:
    """Where internal failures write their tracebacks: $TVM_COMPRESS_LOG_DIR, else
    ~/.cache/tvm-compress/logs (the system temp folder if that cannot be written)."""
    import os
    import tempfile

    base = os.environ.get("TVM_COMPRESS_LOG_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvm-compress" / "logs")
    for folder in (Path(base), Path(tempfile.gettempdir()) / "tvm-compress-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except OSError:
            continue
    return Path(tempfile.gettempdir())


def report_internal_failure(args: argparse.Namespace, con: Console, exc: BaseException,
                            argv: list[str] | None) -> str:
    """Write the traceback to a log file; the one line for the terminal names stage and model."""
    import os
    import sys
    import traceback

    step = con.stage or args.command
    stage = _STAGES.get(step.split()[0], step)
    model = getattr(args, "model", None)
    command = getattr(args, "command", "tvm-compress")
    path = log_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"
    path.write_text(
        f"tvm-compress {' '.join(argv if argv is not None else sys.argv[1:])}\n"
        f"stage: {stage} ({step})\nmodel: {model}\n\n"
        + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    _release_into(exc, path)
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return (f"error: internal failure in stage '{stage}'" + (f" of model {model}" if model else "")
            + f": {type(exc).__name__}: {first} (traceback in {path}; please report it)")


def _release_into(exc: BaseException, log: Path) -> None:
    """Free the failed frames' objects now, with stderr pointed at the log: TVM's C++ destructors
    warn on stderr about half-built modules ("BlockBuilder destroyed with remaining blocks")."""
    import gc
    import os
    import sys
    import traceback

    def release() -> None:
        seen: set[int] = set()
        cur: BaseException | None = exc
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            traceback.clear_frames(cur.__traceback__)
            cur = cur.__cause__ or cur.__context__
        gc.collect()

    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded)
        release()
        return
    with open(log, "a") as out:
        os.dup2(out.fileno(), 2)
        try:
            release()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _wbits(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 2-8 or auto, got {text!r}") from None


def auto_weight_bits(args: argparse.Namespace) -> int | None:
    """The weight bits ``--wbits auto`` stands for on ``args.target`` (None when the bits were
    given, by ``--wbits N`` or ``--config``)."""
    from tvm_compress.backend.schedules.hardware import preferred_weight_bits
    from tvm_compress.backend.targets import resolve_target

    if getattr(args, "config", None) or getattr(args, "wbits", "auto") != "auto":
        return None
    return preferred_weight_bits(resolve_target(getattr(args, "target", "x86")))


def quant_config(args: argparse.Namespace, *, weight_bits: int | None = None) -> Any:
    """The QuantConfig of the quantize flags (``--config`` wins); ``weight_bits`` replaces an
    ``--wbits auto``."""
    from tvm_compress.quant.config import LayerOverride, QuantConfig, QuantSpec

    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file not found: {path} (a JSON QuantConfig, see --help)")
        return QuantConfig.from_json(path.read_text())
    overrides = {name: LayerOverride(fp32=True) for name in args.fp32 or []}
    wbits = args.wbits if args.wbits != "auto" else (weight_bits or auto_weight_bits(args))
    return QuantConfig(weight=QuantSpec(wbits, args.wscheme, args.granularity),
                       activation=QuantSpec(args.abits, args.ascheme),
                       calibration=args.calibration, calib_samples=args.calib_samples,
                       percentile=args.percentile, overrides=overrides)


def npz_images(path_text: str, what: str, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path} (an .npz with 'images' [and 'labels'])")
    with np.load(path) as npz:
        if "images" not in npz:
            raise UserError(f"{path} has no 'images' array; save it with "
                            "np.savez(path, images=..., labels=...)")
        return npz["images"].astype(dtype), (npz["labels"] if "labels" in npz else None)


def add_common(p: argparse.ArgumentParser, *, model: bool = True, target: bool = False) -> None:
    if model:
        p.add_argument("model", help=MODEL_HELP)
    if target:
        p.add_argument("--target", default="x86",
                       help="target preset (x86, x86-avx2, aarch64, cuda-sm80, ...)")
    p.add_argument("--batch", type=int, default=1, help="batch size to import with (default 1)")
    p.add_argument("--input-shape", action="append", metavar="[NAME:]1x3x224x224",
                   help="pin an ONNX input's shape (dynamic dimensions); NAME: for models with "
                        "several inputs (repeat per input). A dynamic batch alone: --batch")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_base_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-plan", action="append", metavar="PLAN.json",
                   help="search on the model as cropped by this plan (repeatable; e.g. a "
                        "PreCrop or AJPQ crop); then compose both with `tvm-compress compress`")


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    from tvm_compress.quant.config import CALIBRATIONS, GRANULARITIES, SCHEMES

    add_base_plan(p)

    p.add_argument("--calib", default="auto", help="calibration .npz ('images'), 'distilled' "
                   "(data-free, ZeroQ) or 'auto': the zoo model's calibration split")
    p.add_argument("--val", help="evaluation .npz ('images', 'labels'); default: zoo test data")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N samples")
    p.add_argument("--config", help="QuantConfig JSON file (overrides the flags below)")
    p.add_argument("--wbits", type=_wbits, default="auto",
                   help="weight bits 2-8, or auto (default): 7 on x86 targets with AVX2 and no "
                        "VNNI when the 7-bit build keeps the accuracy (else 8), 8 elsewhere")
    p.add_argument("--abits", type=int, default=8, help="activation bits 2-8 (default 8)")
    p.add_argument("--wscheme", default="symmetric", choices=SCHEMES)
    p.add_argument("--ascheme", default="asymmetric", choices=SCHEMES)
    p.add_argument("--granularity", default="per_channel", choices=GRANULARITIES,
                   help="weight granularity (activations are per tensor)")
    p.add_argument("--calibration", default="minmax", choices=CALIBRATIONS)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--fp32", nargs="*", metavar="LAYER", help="layers to keep in fp32")
    p.add_argument("--repeat", type=int, default=10, help="timed runs (0: no latency)")
    p.add_argument("-o", "--output", help="directory for config.json and model.so")

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

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
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
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    print(json.dumps(obj, default=default, allow_nan=True))


def load_model(args: argparse.Namespace) -> Any:
    from tvm_compress.frontend.loader import load_from_args

    return load_from_args(args)


def reference_outputs(model: Any, images: np.ndarray) -> tuple[str, np.ndarray]:
    """Outputs of the source framework (PyTorch, else ONNX Runtime) for fidelity checks."""
    if model.torch_module is not None:
        import torch

        with torch.inference_mode():
            outs = [model.torch_module(torch.from_numpy(images[i:i + 256])).numpy()
                    for i in range(0, len(images), 256)]
        return "pytorch", np.concatenate(outs)
    from tvm_compress.runtime.bench import onnxruntime_session

    session = onnxruntime_session(model.onnx_model, threads=2)
    name = session.get_inputs()[0].name
    batch = model.input_shape[0]
    outs = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(session.run(None, {name: chunk})[0][:n])
    return "onnxruntime", np.concatenate(outs)


def _print_bench(con: Console, result: dict[str, Any]) -> None:
    rows = []
    for runtime in ("tvm", "onnxruntime", "pytorch"):
        if runtime in result:
            rows.append([runtime, result[runtime]["median_ms"],
                         result["ratio_to_onnxruntime"][runtime]])
    con.table(f"latency of {result['model']} {result['input_shape']} on {result['threads']} "
              "threads", ["runtime", "median ms", "x ONNX Runtime"], rows)


def quant_config(args: argparse.Namespace) -> Any:
    from tvm_compress.quant.config import LayerOverride, QuantConfig, QuantSpec

    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file not found: {path} (a JSON QuantConfig, see --help)")
        return QuantConfig.from_json(path.read_text())
    overrides = {name: LayerOverride(fp32=True) for name in args.fp32 or []}
    return QuantConfig(weight=QuantSpec(args.wbits, args.wscheme, args.granularity),
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
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    from tvm_compress.quant.config import CALIBRATIONS, GRANULARITIES, SCHEMES

    p.add_argument("--calib", default="auto", help="calibration .npz ('images'), 'distilled' "
                   "(data-free, ZeroQ) or 'auto': the zoo model's calibration split")
    p.add_argument("--val", help="evaluation .npz ('images', 'labels'); default: zoo test data")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N samples")
    p.add_argument("--config", help="QuantConfig JSON file (overrides the flags below)")
    p.add_argument("--wbits", type=int, default=8, help="weight bits 2-8 (default 8)")
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

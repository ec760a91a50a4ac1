"""FacePro's model manifest, and installing model files into a models dir with checksum verification.

The manifest (``pipeline/resources/models.yaml``, shipped in the package) lists
each known ONNX model by name: file name, role, official download URL (or
None where upstream publishes no ONNX file), source page, sha256, size in
bytes, licence and whether commercial use is allowed.

:func:`fetch` downloads a model (HTTPS from the official URL, or from a
mirror: ``base_url`` / the ``FACEPRO_MODELS_MIRROR`` environment variable,
``<base>/<file>``); :func:`import_file` copies one from a local folder. Both
write to a temporary file in the models dir (owner-only, 0600), check the
size and sha256, and only then rename it to its final name, so a cut
download, a server error or a wrong checksum never leaves a file in place.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Literal

import yaml

#: Environment variable naming a mirror that serves ``<mirror>/<file>`` for every manifest model.
MIRROR_ENV = "FACEPRO_MODELS_MIRROR"
#: Prefix by which a config names a manifest model instead of a path (``path: model:yolox_nano``).
MODEL_REF = "model:"
_CHUNK = 1 << 16

Status = Literal["present", "missing", "wrong-checksum"]


class ModelFetchError(RuntimeError):
    """A model that cannot be installed: unknown name, no download, HTTP/network error, size or sha256 mismatch."""


@dataclass(frozen=True)
class ModelSpec:
    """One manifest entry. ``size`` in bytes; ``url`` None when upstream publishes no direct ONNX download."""

    name: str
    file: str
    role: str
    default: bool
    url: str | None
    source: str
    sha256: str
    size: int
    licence: str
    commercial_use: str

    @property
    def non_commercial(self) -> bool:
        """True unless the weights' licence is known to allow commercial use."""
        return self.commercial_use != "yes"


def manifest() -> dict[str, ModelSpec]:
    """Every model of the shipped manifest by name, in manifest order."""
    text = resources.files("pipeline").joinpath("resources/models.yaml").read_text(encoding="utf-8")
    return {name: ModelSpec(name=name, **entry) for name, entry in yaml.safe_load(text)["models"].items()}


def get_spec(name: str) -> ModelSpec:
    """The manifest entry ``name``.

    Raises:
        ModelFetchError: no such model (the message lists the known names).
    """
    models = manifest()
    if name not in models:
        raise ModelFetchError(f"unknown model {name!r}; known models: {', '.join(models)} (see facepro models list)")
    return models[name]


def spec_for_file(path: Path) -> ModelSpec | None:
    """The manifest entry whose file name is ``path``'s, or None."""
    return next((s for s in manifest().values() if s.file == Path(path).name), None)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_status(spec: ModelSpec, path: Path) -> Status:
    """``present`` (size and sha256 match the manifest), ``missing`` or ``wrong-checksum``."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != spec.size or sha256_file(path) != spec.sha256:
        return "wrong-checksum"
    return "present"


def status(spec: ModelSpec, models_dir: Path) -> Status:
    """:func:`file_status` of the model's file in ``models_dir``."""
    return file_status(spec, Path(models_dir) / spec.file)


def download_url(spec: ModelSpec, base_url: str | None = None) -> str:
    """Where :func:`fetch` gets ``spec``: ``<base_url>/<file>``, else ``$FACEPRO_MODELS_MIRROR/<file>``, else the official URL.

    Raises:
        ModelFetchError: no mirror and no official direct download, or an official URL that is not https.
    """
    base = base_url or os.environ.get(MIRROR_ENV)
    if base:
        return f"{base.rstrip('/')}/{spec.file}"
    if spec.url is None:
        raise ModelFetchError(
            f"{spec.name}: upstream publishes no direct ONNX download; get {spec.file} from {spec.source}, "
            f"then: facepro models fetch --from DIR (or use a mirror: --base-url URL / {MIRROR_ENV})")
    if not spec.url.startswith("https://"):
        raise ModelFetchError(f"{spec.name}: manifest URL {spec.url} is not https")
    return spec.url


def fetch(spec: ModelSpec, models_dir: Path, base_url: str | None = None, *, timeout_s: float = 30.0,
          progress: bool | None = None) -> bool:
    """Download ``spec`` into ``models_dir`` unless a verified copy is already there.

    Args:
        spec: the manifest entry.
        models_dir: target folder (created 0700 if missing).
        base_url: mirror serving ``<base_url>/<file>`` (see :func:`download_url`).
        timeout_s: socket timeout per connect/read, seconds.
        progress: show a tqdm bar on stderr; None: only on a terminal.

    Returns:
        True if a file was downloaded, False if a verified copy was present.

    Raises:
        ModelFetchError: no download location, HTTP or network error, truncated
            body, size or sha256 mismatch (nothing is left in ``models_dir``).
    """
    models_dir = Path(models_dir)
    if status(spec, models_dir) == "present":
        return False
    url = download_url(spec, base_url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - https or a chosen mirror
            length = resp.headers.get("Content-Length")
            _install(spec, models_dir, resp, int(length) if length and length.isdigit() else spec.size, url, progress)
    except urllib.error.HTTPError as err:
        raise ModelFetchError(f"{spec.name}: {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise ModelFetchError(f"{spec.name}: download from {url} failed: {reason}") from None
    return True


def import_file(spec: ModelSpec, models_dir: Path, source_dir: Path) -> bool:
    """Copy ``spec``'s file from ``source_dir`` into ``models_dir`` with the same checks as :func:`fetch`.

    Returns:
        True if a file was copied, False if a verified copy was present.

    Raises:
        ModelFetchError: the file is missing in ``source_dir``, or its size or sha256 differ.
    """
    models_dir = Path(models_dir)
    if status(spec, models_dir) == "present":
        return False
    src = Path(source_dir) / spec.file
    try:
        with open(src, "rb") as f:
            _install(spec, models_dir, f, src.stat().st_size, str(src), progress=False)
    except FileNotFoundError:
        raise ModelFetchError(f"{spec.name}: {src} does not exist") from None
    return True


def _install(spec: ModelSpec, models_dir: Path, stream: BinaryIO, total: int, where: str, progress: bool | None) -> None:
    """Stream into a temp file in ``models_dir``, verify, rename to ``spec.file``; the temp file never survives a failure."""
    from tqdm import tqdm

    models_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=models_dir, prefix=f".{spec.file}.", suffix=".part")  # mode 0600
    try:
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=spec.file,
                                              disable=None if progress is None else not progress) as bar:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
                bar.update(len(chunk))
        if n != spec.size:
            raise ModelFetchError(f"{spec.name}: {where}: got {n} bytes, expected {spec.size} (cut download or another file); nothing installed")
        if h.hexdigest() != spec.sha256:
            raise ModelFetchError(f"{spec.name}: {where}: sha256 {h.hexdigest()} differs from the manifest's {spec.sha256}; nothing installed")
        os.replace(tmp, models_dir / spec.file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

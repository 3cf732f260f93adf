"""A Triton-like model repository: ``root/<name>/<version>/{model.onnx, manifest.yaml}``.

Every model handed out has been validated: its manifest parses, the file's SHA-256 equals
the manifest's, and the ONNX graph's first input and output agree with the manifest.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from models.manifest import ModelManifest, TensorSpec, load_manifest, version_key
from radbridge.errors import ModelError

__all__ = ["MANIFEST_FILE", "MODEL_FILE", "LoadedModel", "ModelRepository", "file_sha256"]

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.yaml"
_DTYPES: dict[int, str] = {
    int(onnx.TensorProto.FLOAT): "float32",
    int(onnx.TensorProto.FLOAT16): "float16",
}


@dataclass(frozen=True)
class LoadedModel:
    """A validated model version."""

    manifest: ModelManifest
    onnx_path: Path

    @property
    def key(self) -> str:
        """``name:version``."""
        return f"{self.manifest.name}:{self.manifest.version}"


def file_sha256(path: Path) -> str:
    """Lowercase hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _graph_dims(value: onnx.ValueInfoProto) -> tuple[str | None, list[int | str | None]]:
    tensor = value.type.tensor_type
    elem = int(tensor.elem_type)
    dtype = _DTYPES.get(elem) or str(onnx.TensorProto.DataType.Name(elem))
    dims: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dtype, dims


def _check_tensor(key: str, role: str, spec: TensorSpec, value: onnx.ValueInfoProto) -> None:
    if value.name != spec.name:
        raise ModelError(
            f"{key}: {role} name mismatch: manifest {spec.name!r}, ONNX {value.name!r}"
        )
    dtype, dims = _graph_dims(value)
    if dtype != spec.dtype:
        raise ModelError(f"{key}: {role} dtype mismatch: manifest {spec.dtype}, ONNX {dtype}")
    if len(dims) != len(spec.shape):
        raise ModelError(
            f"{key}: {role} rank mismatch: manifest {len(spec.shape)} {spec.shape}, "
            f"ONNX {len(dims)} {dims}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, dims, strict=True)):
        if isinstance(got, int) and want != got:
            raise ModelError(
                f"{key}: {role} dim {axis} mismatch: manifest {want!r}, ONNX fixed {got}"
            )
        if not isinstance(got, int) and not isinstance(want, str):
            raise ModelError(
                f"{key}: {role} dim {axis} mismatch: manifest fixed {want}, ONNX dynamic {got!r}"
            )


class ModelRepository:
    """Validated access to the models under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def validate(self, version_dir: Path) -> LoadedModel:
        """Validate one ``<name>/<version>`` folder.

        Raises:
            ModelError: Naming the model and the mismatch (manifest field, folder name,
                sha256, or the ONNX input/output name, dtype, rank or a fixed dimension).
        """
        version_dir = Path(version_dir)
        manifest = load_manifest(version_dir / MANIFEST_FILE)
        key = f"{manifest.name}:{manifest.version}"
        if (version_dir.parent.name, version_dir.name) != (manifest.name, manifest.version):
            raise ModelError(
                f"{key}: folder {version_dir.parent.name}/{version_dir.name} does not match "
                f"manifest name/version {manifest.name}/{manifest.version}"
            )
        onnx_path = version_dir / MODEL_FILE
        if not onnx_path.is_file():
            raise ModelError(f"{key}: {MODEL_FILE} missing in {version_dir}")
        digest = file_sha256(onnx_path)
        if digest != manifest.sha256:
            raise ModelError(f"{key}: sha256 mismatch: manifest {manifest.sha256}, file {digest}")
        try:
            graph = onnx.load(str(onnx_path), load_external_data=False).graph
        except Exception as exc:
            raise ModelError(f"{key}: {MODEL_FILE} is not a readable ONNX model: {exc}") from None
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if not inputs or not graph.output:
            raise ModelError(f"{key}: ONNX graph has no input or no output")
        _check_tensor(key, "input", manifest.input, inputs[0])
        _check_tensor(key, "output", manifest.output, graph.output[0])
        return LoadedModel(manifest=manifest, onnx_path=onnx_path)

    def installed(
        self, version_dir: Path, log: Callable[[str], None] = print
    ) -> LoadedModel | None:
        """The valid model already installed at ``version_dir``, or None (absent or invalid:
        a build then replaces it)."""
        if not (version_dir / MANIFEST_FILE).is_file():
            return None
        try:
            existing = self.validate(version_dir)
        except ModelError as exc:
            log(f"existing model invalid, rebuilding: {exc}")
            return None
        log(f"{existing.key}: valid model present at {version_dir}; not retraining")
        return existing

    def _version_dirs(self, name: str | None = None) -> builtins.list[Path]:
        if not self.root.is_dir():
            return []
        names = [self.root / name] if name else sorted(self.root.iterdir())
        found = []
        for model_dir in names:
            if not model_dir.is_dir() or model_dir.name.startswith("."):
                continue
            for v in model_dir.iterdir():
                if v.is_dir() and (v / MANIFEST_FILE).is_file():
                    found.append(v)
        return sorted(found, key=lambda p: (p.parent.name, version_key(p.name)))

    def list(self) -> builtins.list[LoadedModel]:
        """Every model version with a manifest, validated, sorted by name then version.

        Raises:
            ModelError: When any of them is invalid (a tampered model is never skipped silently).
        """
        return [self.validate(v) for v in self._version_dirs()]

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """One validated model; ``version=None`` means the highest integer version.

        Raises:
            ModelError: Not found, or invalid.
        """
        if version is not None:
            version_dir = self.root / name / str(version)
            if not (version_dir / MANIFEST_FILE).is_file():
                raise ModelError(f"{name}:{version}: model not found in {self.root}")
            return self.validate(version_dir)
        dirs = self._version_dirs(name)
        if not dirs:
            raise ModelError(f"{name}: model not found in {self.root}")
        return self.validate(dirs[-1])

    def for_modality(self, modality: str) -> LoadedModel | None:
        """The newest model whose manifest lists ``modality`` (last by name, version), or None."""
        found = [m for m in self.list() if modality in m.manifest.modalities]
        return found[-1] if found else None

"""A folder of safetensors weights as the Hugging Face Hub stores a model: either sharded (an index,
`model.safetensors.index.json`, whose "weight_map" names the shard of every tensor) or a single
`model.safetensors`. Which file holds which tensor, every tensor's shape (read from the headers, nothing
loaded), and the tensors themselves, read one by one straight onto a device in a dtype.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import torch

from core.files import UserError, read_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _open(path: Path, device: str = "cpu"):
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{path} does not exist (the weights are incomplete)")
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:  # a damaged header, a file cut short
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise UserError(f"cannot read {path}: {type(e).__name__}: {first}") from None


def tensor_files(folder: Path) -> dict[str, Path]:
    """Every tensor name of the folder's weights → the file that holds it."""
    index = folder / INDEX
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} has no \"weight_map\" of tensor names to file names")
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE
    if single.is_file():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise UserError(f"{folder} holds neither {INDEX} nor {SINGLE}")


def _by_file(names: Iterable[str], files: Mapping[str, Path]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = defaultdict(list)
    for name in names:
        grouped[files[name]].append(name)
    return grouped


def tensor_shapes(files: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the file headers (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, names in _by_file(files, files).items():
        with _open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise UserError(f"{path} lacks {name}, which {INDEX} places there")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def read_tensors(files: Mapping[str, Path], rename: Mapping[str, str], device: torch.device | str,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors named by `rename`'s keys, under its values, read file by file onto `device` in `dtype`."""
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    for path, names in _by_file(rename, files).items():
        with _open(path, _device_name(device)) as f:
            for name in names:
                out[rename[name]] = f.get_tensor(name).to(dtype)
    return out

"""Host tier of the expert weights: one contiguous record per (MoE layer, expert).

A record is the expert's gate_up block followed by its down block, in the layout the model computes
with, so a cache miss is exactly one copy. Records are filled straight from the safetensors files
(never via a full model state dict), so loading needs the expert bytes once, not twice.

Checkpoint layouts accepted (detected per key and by shape):
  * fused, transformers 5: `...experts.gate_up_proj [E, 2I, H]`, `...experts.down_proj [E, H, I]`
  * fused, transformers 4 / Qwen3-VL hub files: `[E, H, 2I]`, `[E, I, H]` (transposed per expert)
  * per expert: `...experts.{j}.gate_proj.weight [I, H]`, `up_proj`, `down_proj [H, I]`
    (Mixtral's `w1`/`w3`/`w2` are the same three).

Where a record's blocks lie in the files as the record holds them (not transposed: the fused
transformers 5 layout, per-expert keys of an untransposed model; one float dtype) it is read with
positioned reads (os.preadv) at the byte offsets the safetensors header gives: straight into the record's
memory, or into a buffer at the file's dtype and cast from there. No tensor is made on the way, and a cold
read is one large read per block rather than the page faults of a memory map. That wins for small records
only (POSITIONED_READ_MAX_BYTES): a large one is copied faster from safetensors' memory map by torch's
threads than by one read's kernel copy. Transposed layouts and large records go through safetensors'
slices and a copy (the transpose, if any).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapters import MoeLayout
from ..errors import ModelLoadError

_FUSED_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.[a-z_]+\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT_RE = re.compile(
    r"(?:^|\.)layers\.(\d+)\.[a-z_]+\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_PER_EXPERT_PART = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# The largest record (at the file's dtype) read with positioned reads. Below it they cost less than the slices
# (easy-VQA's 192 KiB float32 records from the page cache: 0.29x the slices' time on a 2-core host, 0.45-0.49x
# on the H200's host, session 12; read at float32 and cast to bfloat16: 0.45x, and 0.68-1.14x there). Above
# it one thread's kernel copy loses to torch's threaded copy from the memory map: the bench model's 9 MiB
# records took 1.0-1.2 ms a read against 0.16 ms, and a pinned store's load 3.8-5.0 s against 2.0-2.6 s
# (H200 host, sessions 12 and 11). On a 2-core host the two cross near 512 KiB (eval/bench_record_reads.py
# --sizes); the H200 host's crossing is not measured yet.
POSITIONED_READ_MAX_BYTES = 256 * 2**10


def is_expert_key(key: str) -> bool:
    return bool(_FUSED_RE.search(key) or _PER_EXPERT_RE.search(key))


@dataclass
class ExpertSource:
    """Where one expert's tensors live in the checkpoint (parts may sit in different shards)."""

    kind: str  # "fused" or "per_expert"
    keys: dict  # part name -> (file, checkpoint key)
    transposed: dict  # part name -> the stored block is the transpose of the model's


class ExpertStore:
    """Expert records on the host, addressed by (MoE layer position, expert id)."""

    def __init__(self, layout: MoeLayout, files: list[Path], dtype: torch.dtype, mode: str, pin: bool,
                 device: torch.device | None = None):
        self.layout = layout
        self.dtype = dtype
        self.num_layers = len(layout.layers)
        self.num_experts = layout.num_experts
        self.record_numel = layout.record_numel
        self.record_bytes = self.record_numel * torch.empty((), dtype=dtype).element_size()
        self.gate_up_numel = layout.gate_up_shape[0] * layout.gate_up_shape[1]
        self.pinned = False
        self._handles: dict[str, object] = {}
        self._read_lock = threading.Lock()  # mmap reads: the CPU miss path's worker reads beside the host path
        # mmap reads under emulation (deploy/emulate.py): each read is timed and held to the emulated disk's time
        self.read_pacer = None
        self._sources = _index_checkpoint(layout, files)
        # Per (layer, expert): the file's dtype and the record's blocks as (file, file offset, record byte
        # offset, bytes) where every block can be read as it lies (else None: safetensors' slices and a copy).
        # Opened files stay open until close(); an mmap store reads through them at every miss.
        self._spans = _direct_spans(self._sources, layout, files)
        self._files: dict[str, int] = {}
        self._cast_buffers: dict[torch.dtype, torch.Tensor] = {}  # a file dtype's record, cast from (one reader)
        weakref.finalize(self, _close_all, self._files)  # (a store dropped without close())
        if mode == "mmap":
            self.slab = None
        else:
            self.slab = huge_page_tensor((self.num_layers, self.num_experts, self.record_numel), dtype)
            for layer in range(self.num_layers):
                for expert in range(self.num_experts):
                    self._read_into(layer, expert, self.slab[layer, expert])
            self._handles.clear()
            _close_all(self._files)
            self._cast_buffers.clear()
            if pin and _pin_in_place(self.slab):
                self.pinned = True
                # Unregister before the slab's memory goes back to the allocator, even when the store
                # is dropped without close(): a later allocation at the same address could not be pinned.
                self._unpin = weakref.finalize(self, _unpin, self.slab, device)

    @property
    def slab_rows(self) -> torch.Tensor:
        """The slab as [layers * experts, record_numel]: row layer * E + expert."""
        return self.slab.view(self.num_layers * self.num_experts, self.record_numel)

    def host_views(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The slab as the model's per-expert matrices, [L * E, ...] each (row layer * E + expert), in the
        slot pool's layout: what a decode kernel reads a missed expert from in place (zero-copy). None for
        an mmap store (no slab)."""
        if self.slab is None:
            return None
        rows = self.slab_rows
        n = rows.shape[0]
        return (rows[:, : self.gate_up_numel].view(n, *self.layout.gate_up_shape),
                rows[:, self.gate_up_numel :].view(n, *self.layout.down_shape))

    @property
    def total_bytes(self) -> int:
        return self.record_bytes * self.num_layers * self.num_experts

    def record(self, layer: int, expert: int, staging: torch.Tensor | None = None) -> torch.Tensor:
        """The expert's record as a 1-D host tensor (read into `staging` in mmap mode)."""
        if self.slab is not None:
            return self.slab[layer, expert]
        if staging is None:
            staging = torch.empty(self.record_numel, dtype=self.dtype)
        pacer = self.read_pacer
        with self._read_lock:  # (held while paced: reads from two threads share one emulated disk)
            started = pacer.clock() if pacer is not None else 0.0
            self._read_into(layer, expert, staging)
            if pacer is not None:
                pacer.pace_read(started)
        return staging

    def split(self, record: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """View a record (host or device) as the model's (gate_up, down) matrices."""
        gate_up = record[: self.gate_up_numel].view(self.layout.gate_up_shape)
        down = record[self.gate_up_numel :].view(self.layout.down_shape)
        return gate_up, down

    def close(self):
        with self._read_lock:  # (not under a reader's feet)
            self._handles.clear()
            _close_all(self._files)
        if self.pinned:
            self._unpin()
            self.pinned = False

    # -- reading the checkpoint -------------------------------------------------------------------

    def _handle(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(file, framework="pt")
            self._handles[file] = handle
        return handle

    def _read_into(self, layer: int, expert: int, out: torch.Tensor) -> None:
        entry = self._spans[layer][expert]
        if entry is None or not out.is_contiguous() or out.device.type != "cpu":
            self._read_via_slices(layer, expert, out)
            return
        dtype, spans = entry
        target = out
        if dtype != out.dtype:  # (read at the file's dtype, then cast: one reader at a time, under the caller)
            target = self._cast_buffers.get(dtype)
            if target is None:
                target = self._cast_buffers[dtype] = torch.empty(self.record_numel, dtype=dtype)
        assert target.numel() == self.record_numel, "a record is read into a 1-D buffer of record_numel"
        buffer = memoryview(target.view(torch.uint8).numpy()).cast("B")
        for file, offset, at, nbytes in spans:
            _pread_into(self._fd(file), buffer[at : at + nbytes], offset, file)
        if target is not out:
            out.copy_(target)

    def _fd(self, file: str) -> int:
        fd = self._files.get(file)
        if fd is None:
            fd = self._files[file] = os.open(file, os.O_RDONLY)
        return fd

    def _read_via_slices(self, layer: int, expert: int, out: torch.Tensor) -> None:
        source = self._sources[layer][expert]
        gate_up, down = self.split(out)

        def block(part: str) -> torch.Tensor:
            file, key = source.keys[part]
            handle = self._handle(file)
            if source.kind == "fused":
                tensor = handle.get_slice(key)[expert]
            else:
                tensor = handle.get_tensor(key)
            return tensor.t() if source.transposed[part] else tensor

        try:
            if source.kind == "fused":
                gate_up.copy_(block("gate_up_proj"))
            else:
                gate, up = block("gate_proj"), block("up_proj")
                if self.layout.is_transposed:
                    gate_up.copy_(torch.cat([gate.t(), up.t()], dim=1))
                else:
                    gate_up[: gate.shape[0]].copy_(gate)
                    gate_up[gate.shape[0] :].copy_(up)
            down.copy_(block("down_proj"))
        except RuntimeError as exc:
            raise ModelLoadError(
                f"expert {expert} of MoE layer {layer} in {source.keys['down_proj'][0]} does not match the model config "
                f"({exc}); the checkpoint and config.json disagree"
            ) from None


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _tensor_offsets(path: str) -> dict:
    """A safetensors file's tensors: {key: (torch dtype or None, shape, file offset, bytes)}. (The format: an
    8-byte little-endian header length, a JSON header with each tensor's data_offsets, then the data.)"""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = {}
    for key, entry in header.items():
        if key != "__metadata__":
            begin, end = entry["data_offsets"]
            out[key] = (_SAFETENSORS_DTYPES.get(entry["dtype"]), tuple(entry["shape"]), 8 + size + begin, end - begin)
    return out


def _direct_spans(sources, layout: MoeLayout, files: list[Path]):
    """Per layer, per expert: (the file's dtype, the record's blocks as (file, file offset, record byte offset,
    bytes) at that dtype) where each block lies in its file as the record holds it (fused and not transposed,
    or per expert in an untransposed model; one float dtype) and the record is at most POSITIONED_READ_MAX_BYTES
    there, else None. All None without os.preadv."""
    if not hasattr(os, "preadv") or sys.byteorder != "little":  # (safetensors' data is little-endian)
        return [[None] * layout.num_experts for _ in layout.layers]
    offsets = {str(path): _tensor_offsets(str(path)) for path in files}
    gate_up = layout.gate_up_shape[0] * layout.gate_up_shape[1]  # (elements)
    down = layout.down_shape[0] * layout.down_shape[1]
    table = []
    for row in sources:
        spans_row = []
        for expert, source in enumerate(row):
            if source.kind == "fused":
                parts = [("gate_up_proj", 0, gate_up), ("down_proj", gate_up, down)]
            elif not layout.is_transposed:  # gate and up stacked on the first axis: two halves of gate_up
                parts = [("gate_proj", 0, gate_up // 2), ("up_proj", gate_up // 2, gate_up // 2),
                         ("down_proj", gate_up, down)]
            else:
                parts = []
            found = [offsets[source.keys[part][0]][source.keys[part][1]] for part, _, _ in parts]
            dtypes = {dtype for dtype, _, _, _ in found}
            if not parts or len(dtypes) != 1 or None in dtypes or any(source.transposed[part] for part, _, _ in parts):
                spans_row.append(None)
                continue
            (dtype,) = dtypes
            element = torch.empty((), dtype=dtype).element_size()
            if (gate_up + down) * element > POSITIONED_READ_MAX_BYTES:  # (the record's bytes in the file)
                spans_row.append(None)
                continue
            spans = []
            for (part, at, numel), (_, shape, offset, total) in zip(parts, found):
                experts = shape[0] if source.kind == "fused" else 1
                # (each block's shape as the record holds it: a per-expert file's shapes are not checked
                # elsewhere, and a wrong one must reach the slices' copy, which names it)
                want = (layout.down_shape if part == "down_proj" else layout.gate_up_shape if part == "gate_up_proj"
                        else (layout.gate_up_shape[0] // 2, layout.gate_up_shape[1]))
                block = tuple(shape[1:] if source.kind == "fused" else shape)
                if block != tuple(want) or total != experts * numel * element:
                    break
                start = offset + (expert * numel * element if source.kind == "fused" else 0)
                spans.append((source.keys[part][0], start, at * element, numel * element))
            spans_row.append((dtype, spans) if len(spans) == len(parts) else None)
        table.append(spans_row)
    return table


def _pread_into(fd: int, buffer: memoryview, offset: int, file: str) -> None:
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            raise ModelLoadError(f"{file} ends at byte {offset + done}, inside an expert's weights (its header "
                                 f"says {offset + len(buffer)}): the file is truncated; download it again")
        done += got


def _close_all(files: dict) -> None:
    for fd in files.values():
        os.close(fd)
    files.clear()


def _index_checkpoint(layout: MoeLayout, files: list[Path]) -> list[list[ExpertSource]]:
    by_decoder = {layer.decoder_index: layer.position for layer in layout.layers}
    gu_shape, down_shape = tuple(layout.gate_up_shape), tuple(layout.down_shape)
    sources: dict[tuple[int, int], dict] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                fused = _FUSED_RE.search(key)
                per = None if fused else _PER_EXPERT_RE.search(key)
                if not fused and not per:
                    continue
                decoder_index = int((fused or per).group(1))
                if decoder_index not in by_decoder:
                    raise ModelLoadError(
                        f"{path.name} holds experts for decoder layer {decoder_index}, which is not a MoE layer "
                        "in config.json; the checkpoint and config disagree"
                    )
                position = by_decoder[decoder_index]
                shape = tuple(handle.get_slice(key).get_shape())
                if fused:
                    part = fused.group(2)
                    expected = gu_shape if part == "gate_up_proj" else down_shape
                    if len(shape) != 3 or shape[0] != layout.num_experts:
                        raise ModelLoadError(f"{key} in {path.name} has shape {list(shape)}, expected [E={layout.num_experts}, ...]")
                    transposed = _orientation(shape[1:], expected, key, path)
                    for expert in range(layout.num_experts):
                        entry = sources.setdefault((position, expert), {"kind": "fused", "keys": {}, "transposed": {}})
                        entry["keys"][part], entry["transposed"][part] = (str(path), key), transposed
                else:
                    expert, part = int(per.group(2)), _PER_EXPERT_PART.get(per.group(3), per.group(3))
                    entry = sources.setdefault((position, expert), {"kind": "per_expert", "keys": {}, "transposed": {}})
                    entry["keys"][part] = (str(path), key)
                    entry["transposed"][part] = False
    table = []
    needed_fused = {"gate_up_proj", "down_proj"}
    needed_per = {"gate_proj", "up_proj", "down_proj"}
    for position in range(len(layout.layers)):
        row = []
        for expert in range(layout.num_experts):
            entry = sources.get((position, expert))
            needed = needed_fused if entry and entry["kind"] == "fused" else needed_per
            if entry is None or set(entry["keys"]) != needed:
                decoder_index = layout.layers[position].decoder_index
                raise ModelLoadError(
                    f"the checkpoint has no (or incomplete) weights for expert {expert} of decoder layer "
                    f"{decoder_index}; the safetensors files are incomplete or do not match config.json"
                )
            row.append(ExpertSource(**entry))
        table.append(row)
    return table


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


def huge_page_tensor(shape, dtype) -> torch.Tensor:
    """An uninitialised host tensor on memory the kernel is asked to back with 2 MiB pages (transparent huge
    pages: an anonymous mapping aligned to 2 MiB, madvise(MADV_HUGEPAGE)). The slab is read by the GPU over
    the bus a record at a time, records it has not read lately: with 4 KiB pages each 9.44 MB record is
    2,300 pages to translate (eval/bench_host_pages.py measures what that costs a copy), and page-locking
    a slab registers every page. Where THP is off, or not Linux, this is ordinary memory."""
    import ctypes
    import mmap
    import sys

    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if size < _HUGE_PAGE or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=dtype)
    area = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(area)
    base = ctypes.addressof(view)
    offset = (-base) % _HUGE_PAGE
    if sys.platform.startswith("linux"):  # MADV_HUGEPAGE's value is Linux's
        try:
            libc = ctypes.CDLL(None)
            libc.madvise(ctypes.c_void_p(base + offset), ctypes.c_size_t(size), ctypes.c_int(_MADV_HUGEPAGE))
        except (OSError, AttributeError):  # no madvise here: ordinary pages
            pass
    del view  # the tensor keeps the mapping alive (torch.frombuffer holds it)
    flat = torch.frombuffer(area, dtype=torch.uint8)[offset: offset + size]
    return flat.view(dtype).view(shape)


# cudaHostRegister flags (cuda_runtime_api.h).
_HOST_REGISTER_PORTABLE = 1
_HOST_REGISTER_MAPPED = 2


def _cuda_ok(err) -> bool:
    return getattr(err, "value", err) == 0


def _unpin(slab: torch.Tensor, device: torch.device | None) -> None:
    # No copy may still be reading the slab when it stops being page-locked.
    torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaHostUnregister(slab.data_ptr())


def _orientation(shape, expected, key, path) -> bool:
    shape, expected = tuple(shape), tuple(expected)
    if shape == expected:
        return False
    if shape == expected[::-1]:
        return True
    raise ModelLoadError(
        f"{key} in {path.name} has per-expert shape {list(shape)}, but the model expects {list(expected)} "
        "(or its transpose); the checkpoint does not match config.json"
    )


def _pin_in_place(tensor: torch.Tensor) -> bool:
    """Page-lock an existing host allocation with cudaHostRegister.

    One registration of one slab: torch's pinned caching allocator would round each block up to a
    power of two (a 58 GB slab would take 64 GB). Registered portable and mapped: without
    `cudaHostRegisterPortable` only the CUDA context current at registration (normally cuda:0) treats
    the slab as page-locked, so an engine on cuda:1 could neither copy it at pinned speed nor read it
    from a kernel.
    """
    if not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(),
                                  _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED)
    ok = _cuda_ok(err)
    if not ok:
        cudart.cudaGetLastError()  # clear it, or the next kernel launch would report it as its own
        import warnings

        warnings.warn(
            f"could not page-lock the {tensor.numel() * tensor.element_size() / 2**30:.1f} GiB expert slab "
            f"(cudaHostRegister error {err}); expert copies will run at pageable speed. Lower the host memory "
            "use or use store: mmap.",
            stacklevel=3,
        )
    return ok

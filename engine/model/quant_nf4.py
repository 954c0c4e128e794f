"""bitsandbytes' 4-bit NormalFloat (NF4) with double quantization, in plain torch.

Why our own torch code instead of calling bitsandbytes: the engine must run where bitsandbytes is absent (the
GPU image has Triton, not bitsandbytes), and quantizing at load is a one-off pass per tensor that plain torch
does fast enough on any device. bitsandbytes stays a dev dependency: the tests compare our bytes with
``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4", compress_statistics=True)`` on CPU, which is also
what transformers runs when it quantizes a model on CPU (the oracle), so equal bytes mean equal weights.

The format (the layout transformers saves, so a saved checkpoint loads without conversion):

    W [N, K] is flattened row-major and cut into blocks of ``blocksize`` (64) consecutive values
    a[b]      = max |w| over block b                                    (fp32)
    idx[i]    = bucketize(w[i] · (1 / a[b]), midpoints of the NF4 table)   (nearest code, ties to the lower one)
    packed    = two indices per byte, the even element in the high nibble
  double quantization of the block scales:
    c         = mean(a)
    q[b]      = 8-bit index of (a[b] - c) · (1 / a2[b // 256]) in the signed dynamic map, where a2 is the absmax
                of each run of 256 scales. bitsandbytes' CPU quantizer rounds through a 65,536-bin lookup table
                (``_nearest_by_lut``), which is not always the exact nearest code; we reproduce it bit for bit.
                (Its CUDA quantizer may pick the neighbouring code for a few scales; either encoding decodes by
                the formula below, and a checkpoint always loads with the bytes it was saved with.)
  dequantization (the one formula every path uses; fp32 products, then the source dtype):
    a[b]      = dyn[q[b]] * a2[b // 256] + c
    w[i]      = nf4[idx[i]] * a[i // 64]

Memory: 4 bits per weight + 8 bits per 64 (scales) + 32 bits per 16,384 = 4.127 bits, 0.258 of bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# The NF4 code book as bitsandbytes defines it (QLoRA, arXiv:2305.14314: quantiles of N(0, 1), normalised to
# [-1, 1] with an exact zero). Stored as fp32, exactly as bitsandbytes' ``get_4bit_type("nf4")``.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_LUT_BINS = 65536


def nf4_code(device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | None = None) -> torch.Tensor:
    """The signed 8-bit dynamic map (bitsandbytes' ``create_dynamic_map()``), 256 sorted fp32 values in [-1, 1].

    Seven decades 10^-6 .. 10^0; decade i holds 2^i values, the midpoints of a float32 ``linspace(0.1, 1)``
    grid scaled by the decade (a float32 product), each with both signs; plus 0 and 1.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        grid = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _nearest_by_lut(normed: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` (sorted, 256) for values in [-1, 1], the way bitsandbytes' CPU quantizer picks it.

    It precomputes, for 65,536 evenly spaced points of [-1, 1], how many code midpoints lie strictly below the
    point, and maps a value to the nearest point (``(v + 1) / 2 * 65535 + 0.5``, truncated). Every step is a
    single fp32 operation, reproduced here in the same order.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32, device=code.device)) / float(_LUT_BINS - 1)
    lut = torch.searchsorted(midpoints, points).to(torch.uint8)
    bins = ((normed.clamp(-1.0, 1.0) + 1.0) * 0.5 * float(_LUT_BINS - 1) + 0.5).to(torch.int64)
    return lut[bins]


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| per run of ``blocksize`` values (the last run may be shorter), fp32."""
    pad = (-flat.numel()) % blocksize
    padded = torch.nn.functional.pad(flat.abs(), (0, pad)) if pad else flat.abs()
    return padded.view(-1, blocksize).amax(dim=1)


def _times_block(flat: torch.Tensor, per_block: torch.Tensor, blocksize: int) -> torch.Tensor:
    """flat[i] * per_block[i // blocksize], broadcasting when the blocks are whole (no per-element copy)."""
    if flat.numel() % blocksize == 0:
        return (flat.view(-1, blocksize) * per_block[:, None]).view(-1)
    return flat * _per_element(per_block, blocksize)[: flat.numel()]


def _per_element(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Expand one value per block to one per element (the last block may be partial: caller slices)."""
    return values.repeat_interleave(blocksize)


@dataclass(frozen=True)
class NF4Tensors:
    """One projection's NF4 weight, exactly the tensors a bitsandbytes checkpoint stores for it.

    ``absmax`` is uint8 when double-quantized (then ``absmax2``/``offset``/``code2`` are set), else fp32.
    """

    packed: torch.Tensor  # uint8 [ceil(N*K/2)]
    absmax: torch.Tensor  # uint8 or fp32 [ceil(N*K/blocksize)]
    code: torch.Tensor  # fp32 [16]
    shape: tuple[int, int]  # (N, K) = (h_out, h_in)
    dtype: torch.dtype  # the dtype the weight had when quantized (dequantized values round through it)
    blocksize: int = BLOCKSIZE
    absmax2: torch.Tensor | None = None  # fp32 [ceil(blocks/nested_blocksize)]
    offset: torch.Tensor | None = None  # fp32 []
    code2: torch.Tensor | None = None  # fp32 [256]
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def to(self, device: torch.device) -> NF4Tensors:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            absmax2=move(self.absmax2),
            offset=move(self.offset),
            code2=move(self.code2),
        )


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = BLOCKSIZE, nested_blocksize: int = NESTED_BLOCKSIZE
) -> NF4Tensors:
    """Quantize a [N, K] weight to NF4 with double quantization, on the weight's device.

    Every step is an elementwise IEEE op, so CPU and CUDA agree, except the scales' mean ``c`` (a reduction whose
    summation order differs by device, so its last bit may too); the tests pin equality on CPU.
    """
    n_out, n_in = weight.shape
    device = weight.device
    flat = weight.reshape(-1).float()
    absmax = _block_absmax(flat, blocksize)
    scaled = torch.clamp(_times_block(flat, 1.0 / absmax.clamp(min=1e-38), blocksize), -1.0, 1.0)
    code = nf4_code(device)
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.nn.functional.pad(idx, (0, 1))
    packed = (idx[0::2] << 4) | idx[1::2]

    offset = absmax.mean()
    centred = absmax - offset
    absmax2 = _block_absmax(centred, nested_blocksize)
    # bitsandbytes multiplies by the fp32 reciprocal; a run of equal scales (absmax2 = 0) stores index 0.
    inverse = torch.where(absmax2 == 0, torch.zeros_like(absmax2), 1.0 / absmax2)
    normed = _times_block(centred, inverse, nested_blocksize)
    code2 = dynamic_map(device)
    qabsmax = _nearest_by_lut(normed, code2)
    zero_runs = _per_element(absmax2 == 0, nested_blocksize)[: centred.numel()]
    qabsmax = torch.where(zero_runs, torch.zeros_like(qabsmax), qabsmax)
    return NF4Tensors(
        packed=packed,
        absmax=qabsmax,
        code=code,
        shape=(n_out, n_in),
        dtype=weight.dtype,
        blocksize=blocksize,
        absmax2=absmax2,
        offset=offset,
        code2=code2,
        nested_blocksize=nested_blocksize,
    )


def block_scales(
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    code2: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    """fp32 scale per 64-block: the stored fp32 absmax, or its double-quantized form expanded."""
    if absmax2 is None or offset is None or code2 is None:
        return absmax.float()
    return _times_block(code2[absmax.long()], absmax2, nested_blocksize) + offset


def dequantize_nf4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    pairs: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    source_dtype: torch.dtype,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W [N, K] in ``dtype`` from packed NF4 bytes and fp32 block ``scales``.

    ``pairs`` is the [256, 2] table of (high-nibble code, low-nibble code) per byte value: one row gather
    (``embedding``, the fastest gather torch has on CPU) decodes two weights.
    """
    n = shape[0] * shape[1]
    values = torch.nn.functional.embedding(packed.long(), pairs).view(-1)[:n]
    full = n - n % blocksize
    if full == n:  # every real shape: one broadcast multiply, no copy
        out = (values.view(-1, blocksize) * scales[:, None]).view(shape)
    else:
        out = torch.empty(n, dtype=torch.float32, device=packed.device)
        out[:full] = (values[:full].view(-1, blocksize) * scales[: full // blocksize, None]).view(-1)
        out[full:] = values[full:] * scales[full // blocksize]
    return out.view(shape).to(source_dtype).to(dtype)


def byte_pairs(code: torch.Tensor) -> torch.Tensor:
    """[256, 2] fp32: the two codes a packed byte holds, high nibble first."""
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous()

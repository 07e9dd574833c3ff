"""DictionaryLinear: y = codes(x @ atoms.T) + b, W ~ C @ atoms with C (out x k) s-sparse per row.

Storage. ``atoms`` (k x in) is the dictionary (one Parameter, possibly shared by
the same projection of several layers). Each output row uses exactly s atoms:
the support is a packed bit mask ``support`` (out x ceil(k/8) bytes, one bit
per (output, atom) pair: k/s bits per nonzero, 2 at CoSpaDi's default
rho = 2, against 16 for int16 indices) and ``values`` (out x s) holds the
coefficients in increasing atom order. The compiled CPU kernels read the
mask itself; int32 indices are rebuilt from it only for the torch kernels
that need them (gather, sparse) and cached until the mask changes.

Row blocks (DSFormer's exported form): with ``blocks`` = g > 1 the output rows
are split into g equal groups, each with its own k atoms; ``atoms`` then holds
g*k rows, group b's atoms at rows b*k .. b*k+k-1, and the support mask stays
k bits per row (local to the row's group).

Kernels (all give the same result up to rounding; ``kernel="auto"`` picks
by the number of tokens, the device and the dtype, thresholds from
``benchmarks/bench_kernels.py``):

- mask:   h = x @ atoms.T (torch's GEMM), then the compiled kernel
  (``factorkit.kernels``, CPU, float32 or bfloat16 values): each 16 bits of
  the mask expand the row's next values into a vector that multiplies 16
  entries of h, reading the values and the mask once (few tokens);
- lanes:  the same product with 16 tokens in each vector, one multiply-add
  per stored value (AVX-512 builds; from about 8 to 128 tokens);
- gather: h = x @ atoms.T, then y[o] = sum_i h[idx[o, i]] * values[o, i]
  (out*s gathered entries of h per token);
- sparse: h @ C.T with C a CSR matrix (torch.sparse; best on the CPU for
  decoding and small batches);
- codes:  scatter C into a dense (out x k) matrix, then a second GEMM
  (best for prefill: two dense GEMMs of total k*(in+out) per token);
- dense:  materialise W = C @ atoms (out x in) and apply it;
- semi24: the code GEMM with C as a 2:4 semi-structured sparse matrix
  (``torch.sparse.to_sparse_semi_structured``: CUDA, half precision, and a
  support with at most 2 nonzeros in every 4 consecutive atoms, as DSFormer's
  "2:4" pattern gives), built once and reused while the values stay unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .base import FactorModule, int8_parts, is_quantized, linear, plain

KERNELS = ("auto", "mask", "lanes", "gather", "sparse", "codes", "dense", "semi24")
COMPILED = ("mask", "lanes")  # the kernels of factorkit.kernels


def pack_support(indices: torch.Tensor, atoms: int) -> torch.Tensor:
    """(out x s) atom indices -> (out x ceil(atoms/8)) uint8 bit mask, bit j%8 of byte j//8."""
    out = indices.shape[0]
    bits = torch.zeros(out, -(-atoms // 8) * 8, dtype=torch.bool, device=indices.device)
    bits.scatter_(1, indices.long(), True)
    weights = (2 ** torch.arange(8, device=indices.device, dtype=torch.int32))
    return (bits.view(out, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_support(mask: torch.Tensor, atoms: int) -> torch.Tensor:
    """The bool (out x atoms) matrix of a packed support mask."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.view(mask.shape[0], -1)[:, :atoms].bool()


def _after_load(module: "DictionaryLinear", incompatible_keys: Any) -> None:
    module.check_support()


class DictionaryLinear(FactorModule):
    factor_type = "dictionary"
    quantizable = ("atoms", "values")
    # Token counts up to which gather / sparse beat the dense code GEMM, from
    # benchmarks/bench_cospadi.py on SmolLM2 shapes. CPU, float32: the CSR
    # kernel wins up to about 64 tokens, gather never did (it stays available).
    # CUDA (H100, bfloat16 and float32, `--device cuda`): every kernel is
    # bound by its few launches at these sizes; gather is the fastest for one
    # token, the code GEMM from a few tokens on, and cuSPARSE's CSR product
    # falls far behind beyond a few tokens.
    GATHER_MAX_TOKENS: ClassVar[int] = 0
    SPARSE_MAX_TOKENS: ClassVar[int] = 64
    CUDA_GATHER_MAX_TOKENS: ClassVar[int] = 1
    # With the compiled kernels (CPU, float32 or bfloat16, no gradient needed), from
    # benchmarks/bench_kernels.py on LLaMA-7B and SmolLM2 shapes: the expanding mask kernel up to
    # 8 tokens, tokens in the lanes up to 128 (AVX2, 8 lanes a vector: 64; in bfloat16 256, where torch's
    # bfloat16 GEMM, without AVX-512's bfloat16 instructions, is slow), the code GEMM beyond.
    MASK_MAX_TOKENS: ClassVar[int] = 8
    LANES_MAX_TOKENS: ClassVar[int] = 128
    AVX2_LANES_MAX_TOKENS: ClassVar[int] = 64
    AVX2_BF16_LANES_MAX_TOKENS: ClassVar[int] = 256

    def __init__(self, in_features: int, out_features: int, atoms: int, sparsity: int, bias: bool = False,
                 kernel: str = "auto", blocks: int = 1, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r} is unknown; choose one of {', '.join(KERNELS)}")
        if blocks < 1 or out_features % blocks:
            raise ValueError(f"blocks must divide the {out_features} output rows, got {blocks}")
        self.in_features, self.out_features = in_features, out_features
        self.num_atoms, self.sparsity, self.kernel, self.blocks = atoms, sparsity, kernel, blocks
        self.total_atoms = blocks * atoms
        kw = {"dtype": dtype, "device": device}
        self.atoms = nn.Parameter(torch.empty(self.total_atoms, in_features, **kw))
        self.values = nn.Parameter(torch.empty(out_features, sparsity, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.register_buffer("support", torch.zeros(out_features, -(-atoms // 8), dtype=torch.uint8, device=device))
        # CSR row pointer of the codes: every row has exactly s entries
        self.register_buffer("crow", torch.arange(0, out_features * sparsity + 1, sparsity, dtype=torch.int32,
                                                  device=device), persistent=False)
        self.register_load_state_dict_post_hook(_after_load)

    @classmethod
    def from_codes(cls, atoms: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                   bias: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                   shared_atoms: nn.Parameter | None = None, blocks: int = 1) -> "DictionaryLinear":
        """Build from atoms (blocks*k x in) and per-row codes (out x s) indexing
        them; with blocks > 1 each row's indices must lie in its group's atoms.
        ``shared_atoms`` reuses another module's dictionary Parameter instead of a copy."""
        dtype = dtype or atoms.dtype
        total, n = atoms.shape
        out, s = indices.shape
        if total % blocks or out % blocks:
            raise ValueError(f"blocks {blocks} must divide the {total} atoms and the {out} rows")
        k = total // blocks
        local = indices - cls._row_offsets(out, k, blocks, indices.device)[:, None]
        if bool(((local < 0) | (local >= k)).any()):
            raise ValueError("with blocks > 1, every row's indices must lie in its own group's atoms")
        module = cls(n, out, k, s, bias is not None, blocks=blocks, dtype=dtype, device=atoms.device)
        order = torch.argsort(indices, dim=1)
        with torch.no_grad():
            if shared_atoms is not None:
                module.atoms = shared_atoms
            else:
                module.atoms.copy_(atoms)
            module.values.copy_(torch.gather(values, 1, order))
            module.support.copy_(pack_support(local, k))
            if bias is not None:
                module.bias.copy_(bias)
        module.check_support()
        return module

    @staticmethod
    def _row_offsets(out: int, atoms: int, blocks: int, device) -> torch.Tensor:
        """For each output row, the first atom of its group."""
        return torch.arange(out, device=device) // (out // blocks) * atoms

    def check_support(self) -> None:
        """Raise ValueError unless every row of the support mask holds exactly ``sparsity`` atoms."""
        counts = unpack_support(self.support, self.num_atoms).sum(1)
        if bool((counts != self.sparsity).any()):
            raise ValueError(f"support mask has rows with {int(counts.min())}..{int(counts.max())} atoms, "
                             f"expected exactly {self.sparsity}")

    @property
    def indices(self) -> torch.Tensor:
        """(out x s) int32 atom indices of the codes (global over the row blocks), increasing along a row:
        rebuilt from the mask when a torch kernel first needs them, cached while the mask is unchanged."""
        key = (self.support.data_ptr(), self.support._version, self.support.device)
        cached = self.__dict__.get("_indices_cache")
        if cached is None or cached[0] != key:
            # nonzero() walks rows in order, atoms ascending: the order of ``values``
            local = unpack_support(self.support, self.num_atoms).nonzero()[:, 1].view(self.out_features,
                                                                                       self.sparsity)
            offsets = self._row_offsets(self.out_features, self.num_atoms, self.blocks, local.device)
            cached = (key, (local + offsets[:, None]).to(torch.int32))
            self.__dict__["_indices_cache"] = cached
        return cached[1]

    def code_matrix(self) -> torch.Tensor:
        """The dense (out x blocks*k) code matrix C, built from the mask (no index is kept)."""
        ext = self._compiled(torch.is_grad_enabled() and self.values.requires_grad)
        if ext is not None:
            return ext.codes_dense(self.support, plain(self.values).detach().contiguous(), self.num_atoms, self.blocks)
        bits = unpack_support(self.support, self.num_atoms)
        local = torch.zeros(self.out_features, self.num_atoms, dtype=self.values.dtype, device=self.values.device)
        local = local.masked_scatter(bits, plain(self.values))  # row-major fill: increasing atoms, as values are stored
        if self.blocks == 1:
            return local
        g, rows = self.blocks, self.out_features // self.blocks
        dense = local.new_zeros(g, rows, g, self.num_atoms)
        group = torch.arange(g, device=local.device)
        dense[group, :, group, :] = local.view(g, rows, self.num_atoms)
        return dense.view(self.out_features, self.total_atoms)

    def dense_weight(self) -> torch.Tensor:
        return self.code_matrix() @ plain(self.atoms)

    def _native_sparse(self) -> bool:
        """torch's CPU CSR product has no half-precision kernel."""
        return self.values.is_cuda or self.values.dtype in (torch.float32, torch.float64)

    def _compiled(self, needs_grad: bool = False):
        """The compiled kernels when they apply to this module (CPU, float32/bfloat16, no gradient), else None."""
        if needs_grad or self.values.device.type != "cpu" or self.values.dtype not in (torch.float32, torch.bfloat16):
            return None
        return kernels.dictionary()  # built on first use

    def pick_kernel(self, tokens: int, needs_grad: bool = False) -> str:
        if self.kernel != "auto":
            return self.kernel
        if self.values.is_cuda:
            return "gather" if tokens <= self.CUDA_GATHER_MAX_TOKENS else "codes"
        ext = self._compiled(needs_grad)
        fast = kernels.usable(ext)
        if "mask" in fast and tokens <= self.MASK_MAX_TOKENS:
            return "mask"
        if "lanes" in fast:
            most = (self.LANES_MAX_TOKENS if ext.isa() != "avx2" else self.AVX2_BF16_LANES_MAX_TOKENS
                    if self.values.dtype == torch.bfloat16 else self.AVX2_LANES_MAX_TOKENS)
            return "lanes" if tokens <= most else "codes"
        if tokens <= self.GATHER_MAX_TOKENS:
            return "gather"
        if tokens <= self.SPARSE_MAX_TOKENS and self._native_sparse():
            return "sparse"
        return "codes"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad
                                                  or self.atoms.requires_grad)
        kernel = self.pick_kernel(x.numel() // self.in_features, needs_grad)
        if kernel in COMPILED:
            return self._compiled_product(kernel, x, needs_grad)
        if kernel == "dense":
            return F.linear(x, self.dense_weight(), self.bias)
        h = linear(x, self.atoms)
        if kernel == "semi24":
            return F.linear(h, self._semi_structured_codes(), self.bias)
        if kernel == "codes":
            return F.linear(h, self.code_matrix(), self.bias)
        lead = h.shape[:-1]
        h2 = h.reshape(-1, self.total_atoms)
        if kernel == "gather":
            # (tokens, out, s) gathered entries of h, weighted and summed over s
            picked = h2.index_select(1, self.indices.flatten()).view(-1, self.out_features, self.sparsity)
            y = (picked * plain(self.values)).sum(-1)
        else:
            values = plain(self.values) if self._native_sparse() else plain(self.values).float()
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                csr = torch.sparse_csr_tensor(self.crow, self.indices.view(-1), values.reshape(-1),
                                              (self.out_features, self.total_atoms))
            y = (csr @ h2.to(values.dtype).T).T.to(h.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _compiled_product(self, kernel: str, x: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        """y = C (atoms x) with the compiled kernels (no autograd: forward only)."""
        ext = self._compiled(needs_grad)
        if ext is None or (kernel == "lanes" and not ext.lane_width()):
            why = ("a gradient is needed" if needs_grad else
                   f"the values are {self.values.device.type} {self.values.dtype}" if ext is None
                   and (self.values.device.type != "cpu" or self.values.dtype not in (torch.float32, torch.bfloat16))
                   else "they are not built on this machine (see the logged reason)" if ext is None
                   else f"this machine's build is {ext.isa()}")
            raise ValueError(f"the {kernel} kernel runs only on factorkit's compiled CPU kernels (lanes: an AVX-512 "
                             f"or AVX2 build) with float32 or bfloat16 values and no gradient, but {why}; "
                             "use kernel='auto'")
        lead = x.shape[:-1]
        h2 = linear(x.reshape(-1, self.in_features), self.atoms).float()
        quantized = int8_parts(self.values) if kernel == "mask" and is_quantized(self.values) else None
        if quantized is not None:  # the int8 numbers and their scales, read as stored
            qdata, scale, group, by_columns = quantized
            y = ext.mask_codes_int8(h2, self.support, qdata, scale, group, by_columns, self.num_atoms, self.blocks)
        elif kernel == "mask":
            y = ext.mask_codes(h2, self.support, plain(self.values).detach().contiguous(), self.num_atoms,
                               self.blocks)
        else:
            tokens = h2.shape[0]
            hT = F.pad(h2, (0, 0, 0, -tokens % ext.lane_width())).T.contiguous()
            y = ext.mask_codes_lanes(hT, self.support, plain(self.values).detach().contiguous(), self.num_atoms,
                                     self.blocks)
            y = y[:, :tokens].T
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.detach()
        return y.reshape(*lead, self.out_features)

    def _semi_structured_codes(self):
        version = (self.values._version, self.values.data_ptr(), self.support._version, self.support.data_ptr())
        cached = getattr(self, "_semi_cache", None)
        if cached is None or cached[0] != version:
            if not self.values.is_cuda or self.values.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError("the semi24 kernel needs a CUDA module in float16 or bfloat16")
            codes = self.code_matrix().detach()
            if self.total_atoms % 4 or bool(((codes.view(self.out_features, -1, 4) != 0).sum(-1) > 2).any()):
                raise ValueError("the semi24 kernel needs at most 2 nonzeros in every 4 consecutive atoms "
                                 "(DSFormer's pattern='2:4')")
            self._semi_cache = (version, torch.sparse.to_sparse_semi_structured(codes))
        return self._semi_cache[1]

    def index_bits(self) -> int:
        """Bits stored for the support mask (beyond the numbers in parameters)."""
        return self.out_features * self.num_atoms

    def spec(self) -> dict[str, Any]:
        spec = {"in_features": self.in_features, "out_features": self.out_features, "atoms": self.num_atoms,
                "sparsity": self.sparsity, "bias": self.bias is not None}
        if self.blocks > 1:
            spec["blocks"] = self.blocks
        return spec

    def extra_repr(self) -> str:
        blocks = f", blocks={self.blocks}" if self.blocks > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.num_atoms}, "
                f"sparsity={self.sparsity}{blocks}, bias={self.bias is not None}, kernel={self.kernel}")

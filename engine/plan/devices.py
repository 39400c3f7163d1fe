"""Device constants of the planner: throughput, bandwidths, and the memory nobody allocates by name.

Planning defaults, not measurements (the FLOP/s and bandwidths are the ones engine/flexsp ships
for the same GPUs, with the same reasoning). The fixed memory terms are stated once here:

* ``CUDA_CONTEXT_GIB = 0.5``: the CUDA context of a PyTorch process (driver state, kernel images
  loaded lazily since CUDA 11.7, cuBLAS workspace). It is outside the caching allocator, so it
  never shows in ``torch.cuda.memory_allocated``; an idle process that has run a GEMM shows about
  0.5 GiB in nvidia-smi on A100/H100 with CUDA 12.
* ``NCCL_COMM_GIB = 0.25`` per communicator that moves bulk data: NCCL's default NCCL_BUFFSIZE is
  4 MiB per channel, per peer and direction; with 16-32 channels and the proxy/staging buffers a
  ring communicator holds some 0.1-0.3 GiB. A group of size 1 costs nothing (no communicator).
* ``ALLOCATOR_FRAGMENTATION = 0.15``: the share of the memory the PyTorch caching allocator holds
  but cannot hand out (free pieces of split blocks too small for the next request). GMLake (Guo et
  al., ASPLOS 2024, arXiv 2401.08156) measured PyTorch's allocator losing on average 15 % (up to
  33 %) of GPU memory to fragmentation when LLM fine-tuning on A100-80GB combines recomputation,
  offloading and ZeRO; we take their average. Usable memory = (device − context − NCCL) · (1 − 0.15).
"""
from __future__ import annotations

import dataclasses

GIB = 2**30
CUDA_CONTEXT_GIB = 0.5
NCCL_COMM_GIB = 0.25
ALLOCATOR_FRAGMENTATION = 0.15


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    linear_flops: float
    """Effective bf16 FLOP/s of large matmuls in training (peak × achievable MFU)."""
    attention_flops: float
    """Effective FLOP/s of FlashAttention-2 causal forward + backward."""
    intra_node_bw: float
    """Bytes/s one GPU moves in a collective inside a node (NVLink)."""
    inter_node_bw: float
    """Bytes/s one GPU moves in a collective across nodes (its InfiniBand port)."""
    host_bw: float
    """Bytes/s between GPU and pinned host memory (PCIe), for offloaded optimizer states."""
    cpu_adam_s_per_param: float
    """Seconds of host time per parameter for one Adam step (DeepSpeed CPUAdam, AVX-512, all cores of
    the GPU's share of the host); only used when the optimizer is offloaded."""
    memory_gib: float = 80.0
    """Memory of one GPU as ``torch.cuda.get_device_properties().total_memory`` reports it, in GiB."""


# A100/A800 (same silicon; the A800 caps NVLink at 400 GB/s): 312 TFLOP/s bf16 peak, linear layers
# at ~53 % (Megatron-LM 7B-scale MFU), FlashAttention-2 causal at ~51 %; NVLink 3 all-to-all ~150
# GB/s algorithmic, one HDR 200 Gb/s port per GPU ~16 GB/s; PCIe 4.0 x16 ~20 GB/s.
# H100-SXM: 989 TFLOP/s dense peak at ~45 % / ~35 %; NVLink 4 ~300 GB/s, NDR 400 Gb/s ~35 GB/s;
# PCIe 5.0 x16 ~40 GB/s. H200: the H100's GH100 with 141 GB of HBM3e (same FLOP/s and links; its
# 4.8 TB/s memory bandwidth is not modelled). Memory as torch reports it: A100-80GB 81920 MiB,
# A800 79.15 GiB (engine/plan/lf360.py), H100-SXM 81559 MiB, H200 143771 MiB.
DEVICES: dict[str, Device] = {
    "a100": Device("a100", 1.65e14, 1.6e14, 1.5e11, 1.6e10, 2.0e10, 1.0e-9, 80.0),
    "a800": Device("a800", 1.65e14, 1.6e14, 1.0e11, 1.6e10, 2.0e10, 1.0e-9, 79.15),
    "h100": Device("h100", 4.45e14, 3.5e14, 3.0e11, 3.5e10, 4.0e10, 1.0e-9, 79.65),
    "h200": Device("h200", 4.45e14, 3.5e14, 3.0e11, 3.5e10, 4.0e10, 1.0e-9, 140.4),
}


def usable_bytes(gpu_memory_gib: float, num_communicators: int,
                 fragmentation: float = ALLOCATOR_FRAGMENTATION) -> float:
    """What the caching allocator can hand to tensors on one GPU of ``gpu_memory_gib`` GiB."""
    fixed = (CUDA_CONTEXT_GIB + NCCL_COMM_GIB * num_communicators) * GIB
    return (gpu_memory_gib * GIB - fixed) * (1.0 - fragmentation)

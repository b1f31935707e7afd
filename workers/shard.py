"""A model shard: one (pipeline stage, tensor rank) of the model, with its part of the KV cache.

The same class runs in-process (the offline API with one shard) and as a Ray actor
(`ray.remote(Shard)`), so there is one code path for both.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .layers.attention import LayerKVCache, Workspace, build_metadata
from .layers.cpu_gemm import PackableLinear, resolve_cpu_gemm
from .layers.quantize import quantize_linears
from .compress import compressed_checkpoint, mark_2_4_sparse
from .layers.verify import sample_and_verify
from .loader import CheckpointReader, resolve_model
from .memory import host_memory, human_bytes
from .models import ModelShape, model_shape
from .models.llama import LlamaForCausalLM
from .parallel import ParallelContext
from .step import SamplingParams, SequenceStep, StepPlan, StepResult

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ShardSpec:
    """Everything a shard needs to start; sent by the launcher."""

    model: str
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # auto: the model's dtype
    quantization: str = "none"  # workers/layers/quantize.py
    smoothquant_alpha: float = 0.5  # migration strength (workers/smoothquant.py)
    llm_int8_threshold: float = 6.0  # outlier magnitude (workers/layers/quantize.py)
    sparsity: str = "none"  # none or 2:4 (workers/sparsity.py)
    sparsity_score: str = "activation"  # which two of four weights stay
    cpu_gemm: str = "auto"  # float32 weight layout on CPU (workers/layers/cpu_gemm.py)
    device: str = "auto"  # auto: cuda when this process sees a GPU, else cpu
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    layer_range: tuple[int, int] | None = None  # None: every layer (single stage)
    sequence_parallel: bool = False
    num_threads: int | None = None  # CPU threads for torch; None keeps torch's choice
    # torch.distributed rendezvous for the TP group of this stage; unused when tp_size == 1.
    dist_init_method: str | None = None
    dist_timeout_s: float = 60.0
    seed: int = 0
    # The LM head scores only these tokens, and sampled indices map back to them: a draft
    # model's restricted vocabulary (cluster/speculative.py), whose head is then a fraction
    # of its cost. None: the whole vocabulary.
    head_token_ids: tuple[int, ...] | None = None

    @classmethod
    def from_config(cls, config, **placement) -> "ShardSpec":
        """The settings every shard of an engine shares, taken by name from its EngineConfig
        (model, dtype, quantization, ...), plus this shard's own place (ranks, layers, ...)."""
        shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
                  if f.name not in placement and hasattr(config, f.name)}
        return cls(**shared, **placement)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The model's dtype and why (for the start message). `auto` picks what this device runs
    fastest: bf16 on GPUs that have it, else fp16; on CPU bf16 only where the CPU has bf16
    instructions (else it runs ~4x slower than fp32)."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
        return DTYPES[name], "as configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU has bfloat16"
        return torch.float16, "auto: this GPU has no bfloat16"
    if cpu_has_fast_bf16():
        return torch.bfloat16, "auto: this CPU has bfloat16 instructions"
    return torch.float32, ("auto: this CPU has no bfloat16 instructions, where bfloat16 runs "
                           "slower than float32")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`auto` stores keys and values in the model's dtype: outputs stay token-exact. A 16-bit
    cache halves the attention's memory traffic and doubles the tokens that fit; int8 (with a
    float32 scale per cached vector) nearly quarters them against float32; both within a
    tolerance (see the README)."""
    if name == "auto":
        return model_dtype
    if name == "int8":
        return torch.int8
    if name not in DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(DTYPES)}, int8; got "
                         f"{name!r}")
    return DTYPES[name]


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def free_memory(device: torch.device) -> tuple[int, str]:
    """Bytes this shard may still allocate on its device, and where that figure comes from:
    the GPU's own free memory, or on CPU the host's, capped by the container's cgroup limit."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"{human_bytes(free)} free of {human_bytes(total)} on {device}"
    report = host_memory()
    return report.available_bytes, report.describe()


def _ray():
    """The ray module when this process is part of a Ray cluster, else None. A process in a
    Ray cluster has imported ray already; asking never imports it, so the offline API runs
    without Ray (even without it installed) and stays quick to start."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _ray_node_id() -> str | None:
    ray = _ray()
    return ray.get_runtime_context().get_node_id() if ray else None


def where_this_runs() -> str:
    """This process's host, as a person would look for it: "hostname (node IP)"."""
    ray = _ray()
    if ray:
        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    return socket.gethostname()


class Shard:
    def __init__(self, spec: ShardSpec):
        self.spec = spec
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        torch.manual_seed(spec.seed)
        self.device = resolve_device(spec.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype, self.dtype_reason = resolve_dtype(spec.dtype, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(spec.kv_cache_dtype, self.dtype)
        self.ctx = ParallelContext(tp_rank=spec.tp_rank, tp_size=spec.tp_size,
                                   pp_rank=spec.pp_rank, pp_size=spec.pp_size,
                                   sequence_parallel=spec.sequence_parallel and spec.tp_size > 1)
        if spec.tp_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=spec.dist_init_method,
                                    rank=spec.tp_rank, world_size=spec.tp_size,
                                    timeout=timedelta(seconds=spec.dist_timeout_s))
            self.ctx.tp_group = dist.group.WORLD

        from transformers import AutoConfig

        # Resolved here, on this shard's own node: its filesystem may not be the driver's (a
        # Kubernetes pod, a ray-up worker), and a GGUF model is converted where it is used.
        try:
            model_dir = resolve_model(spec.model)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"the shard for pipeline stage {spec.pp_rank}, tensor rank "
                                    f"{spec.tp_rank} on node {where_this_runs()} cannot load "
                                    f"the model: {e}") from None
        model_dir, self.quantization, self.sparsity = compressed_checkpoint(model_dir, spec)
        hf_config = AutoConfig.from_pretrained(model_dir)
        self.shape: ModelShape = model_shape(hf_config)
        layer_range = spec.layer_range or (0, self.shape.num_layers)
        with torch.device(self.device):
            self.model = LlamaForCausalLM(hf_config, self.shape, self.ctx, layer_range,
                                          self.dtype, self.device, spec.head_token_ids)
        self.model.load(CheckpointReader(model_dir))
        self.model.eval()
        if self.sparsity == "2:4":
            mark_2_4_sparse(self.model, self.ctx)
        quantize_linears(self.model, self.quantization, self.ctx, spec.llm_int8_threshold)
        self.cpu_gemm, self.cpu_gemm_reason = (resolve_cpu_gemm(spec.cpu_gemm)
                                               if self.device.type == "cpu" else ("", "GPU"))
        for module in self.model.modules():
            if isinstance(module, PackableLinear):
                module.pack_for_cpu(self.cpu_gemm)
                module.pack_for_cuda()
        self.model.prepare_decode_layers(self.dtype, self.device)
        self.kv_caches: list[LayerKVCache] = []
        self.block_size = 0
        self.workspace = Workspace(self.kv_cache_dtype, self.device)
        self.busy_seconds = 0.0  # time spent inside execute(): the pipeline bubble's complement
        self.steps = 0

    # --- KV cache -------------------------------------------------------------------------

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes this shard needs per KV block: its layers x its KV heads only."""
        heads = self.model.layers[0].self_attn.heads if len(self.model.layers) else None
        num_kv = heads.num_kv if heads else 0
        element = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        vector = self.shape.head_dim * element + (4 if self.kv_cache_dtype == torch.int8 else 0)
        return 2 * len(self.model.layers) * num_kv * block_size * vector

    def weights_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.parameters())

    def kv_blocks_that_fit(self, block_size: int, budget_bytes: int | None,
                           memory_fraction: float) -> int:
        """How many blocks this shard can hold: an explicit byte budget, or a fraction of the
        memory free now (after the weights are loaded). A budget that does not fit is refused
        with the numbers."""
        per_block = self.kv_block_bytes(block_size)
        if not per_block:
            return 2 ** 31  # a stage without layers keeps no KV
        free, where = free_memory(self.device)
        if budget_bytes is None:
            budget_bytes = int(free * memory_fraction)
        elif budget_bytes > free:
            raise ValueError(self._does_not_fit(
                f"kv_cache.kv_cache_memory asks for {human_bytes(budget_bytes)} of KV cache",
                where, "lower kv_cache.kv_cache_memory"))
        blocks = budget_bytes // per_block
        if blocks < 1:
            raise ValueError(self._does_not_fit(
                f"the KV budget of {human_bytes(budget_bytes)} holds no block of {block_size} "
                f"tokens ({human_bytes(per_block)} each)", where,
                "raise kv_cache.kv_cache_memory or kv_cache.kv_memory_fraction"))
        return blocks

    def _does_not_fit(self, what: str, where: str, fix: str) -> str:
        return (f"{what} on the shard for pipeline stage {self.spec.pp_rank}, tensor rank "
                f"{self.spec.tp_rank} ({where_this_runs()}, {self.device}); its weights take "
                f"{human_bytes(self.weights_bytes())} and {where}: {fix}")

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        needed = num_blocks * self.kv_block_bytes(block_size)
        free, where = free_memory(self.device)
        if needed > free:
            raise ValueError(self._does_not_fit(
                f"{num_blocks} KV blocks of {block_size} tokens need {human_bytes(needed)}",
                where, "lower kv_cache.num_kv_blocks"))
        self.block_size = block_size
        self.kv_caches = []
        for layer in self.model.layers:
            heads = layer.self_attn.heads
            shape = (heads.num_kv, num_blocks, block_size, self.shape.head_dim)
            cache = LayerKVCache(
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device))
            if self.kv_cache_dtype == torch.int8:
                cache.key_scales = torch.zeros(shape[:-1], device=self.device)
                cache.value_scales = torch.zeros(shape[:-1], device=self.device)
            self.kv_caches.append(cache)

    # --- one step ---------------------------------------------------------------------------

    def execute(self, plan: StepPlan, hidden: torch.Tensor | None = None):
        """Run this shard's layers for the plan. The last stage returns sampled tokens, earlier
        stages hidden states for the next; only TP rank 0 returns them (the other ranks hold
        the same values), the others return None."""
        start = time.perf_counter()
        try:
            return self._execute(plan, hidden)
        finally:
            self.busy_seconds += time.perf_counter() - start
            self.steps += 1

    def _forward(self, seqs: list[SequenceStep], hidden: torch.Tensor | None) -> torch.Tensor:
        """This shard's layers over the sequences' tokens, in the order given."""
        token_ids = [t for s in seqs for t in s.token_ids]
        positions = [p for s in seqs for p in range(s.start_position, s.context_length)]
        meta = build_metadata(seqs, self.block_size, self.shape.sliding_window,
                              self.workspace, self.device, self.model.rotary.dynamic)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if hidden is not None:
            hidden = hidden.to(self.device)
        return self.model(ids if self.ctx.is_first_stage else None, hidden, pos, self.kv_caches,
                          meta)

    @torch.inference_mode()
    def _execute(self, plan: StepPlan, hidden: torch.Tensor | None):
        # Decodes first, longest first: the attention batches them together, in groups of
        # similar length. Every shard orders the same way, so hidden-state rows line up
        # between pipeline stages.
        seqs = sorted(plan.seqs, key=lambda s: (not s.is_decode,
                                                -s.context_length if s.is_decode else 0))
        out = self._forward(seqs, hidden)
        if not self.ctx.is_last_stage:
            if self.ctx.tp_rank != 0:
                return None
            return out.cpu() if self.device.type == "cuda" else out
        rows, to_sample, end = [], [], 0
        for s in seqs:
            end += len(s.token_ids)
            if s.sample:  # the last token, and any drafts before it (speculative decoding)
                rows.extend(range(end - 1 - s.num_draft, end))
                to_sample.append(s)
        if not to_sample:
            return StepResult(plan.step_id) if self.ctx.tp_rank == 0 else None
        normed = self.model.norm(out[rows])[0]
        logits = self.model.lm_head(normed).float()
        if self.ctx.tp_rank != 0:
            return None
        tokens = sample_and_verify(logits, to_sample)
        if self.spec.head_token_ids is not None:  # column i of the logits is token ids[i]
            for t in tokens:
                if t.error is None:
                    t.token_id = self.spec.head_token_ids[t.token_id]
        result = StepResult(plan.step_id, tokens)
        if plan.return_hidden:
            result.hidden_states = self._last_emitted_hidden(normed, to_sample, tokens)
        return result

    @staticmethod
    def _last_emitted_hidden(normed: torch.Tensor, seqs: list[SequenceStep],
                             tokens: list) -> dict:
        """seq_id -> the normed hidden row its last emitted token was sampled from (row i of
        a verifying sequence gave its i-th emitted token); none for a sequence that failed."""
        emitted: dict[int, int] = {}
        failed = set()
        for t in tokens:
            emitted[t.seq_id] = emitted.get(t.seq_id, 0) + 1
            if t.error:
                failed.add(t.seq_id)
        rows = normed.float().cpu().numpy()
        out, row = {}, 0
        for s in seqs:
            if s.seq_id not in failed:
                out[s.seq_id] = rows[row + emitted[s.seq_id] - 1]
            row += s.num_draft + 1
        return out

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> list[float]:
        """Natural-log probability of each token after the first, given those before it: one
        prefill of the whole list from the start of the KV cache (for `shardserve quality`
        and calibration: a single shard that serves nothing else; it allocates the cache
        the list needs when it has less)."""
        assert self.ctx.tp_size == 1 and self.ctx.pp_size == 1, "scoring runs on one shard"
        assert self.spec.head_token_ids is None, "scoring needs the whole vocabulary"
        block_size = self.block_size or 16
        blocks = -(-len(token_ids) // block_size)
        if not self.kv_caches or blocks > self.kv_caches[0].keys.shape[1]:
            self.allocate_kv(blocks, block_size)
        seq = SequenceStep(0, list(token_ids), 0, list(range(blocks)), False, SamplingParams(),
                           0, 0)
        out = self._forward([seq], None)
        logprobs = torch.log_softmax(self.model.compute_logits(out[:-1]), dim=-1)
        targets = torch.tensor(token_ids[1:], device=logprobs.device)[:, None]
        return logprobs.gather(1, targets).squeeze(1).tolist()

    def stats(self) -> dict:
        return {"busy_seconds": self.busy_seconds, "steps": self.steps}

    def describe(self) -> dict:
        node = _ray_node_id()
        # Shards that share a memory_domain share its free memory when the KV cache is sized.
        domain = (torch.cuda.get_device_properties(self.device).uuid if self.device.type == "cuda"
                  else "host")
        return {"node_id": node, "hostname": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "dtype_reason": self.dtype_reason,
                "kv_cache_dtype": str(self.kv_cache_dtype).replace("torch.", ""),
                "quantization": self.quantization, "sparsity": self.sparsity,
                "weight_bytes": self.weights_bytes(),
                "cpu_gemm": self.cpu_gemm, "cpu_gemm_reason": self.cpu_gemm_reason,
                "memory_domain": f"{node}:{domain}",
                "layers": list(self.model.layer_range), "tp_rank": self.spec.tp_rank,
                "pp_rank": self.spec.pp_rank, "threads": torch.get_num_threads()}

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

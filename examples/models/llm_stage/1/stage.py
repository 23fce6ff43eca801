"""One pipeline stage of a Llama-architecture decoder: a contiguous range of its layers, with the KV cache of
every sequence that passes through it, stepping many sequences in one batch.

Loading is real: the stage reads `config.json` into transformers' `LlamaConfig`, builds transformers' own
modules (`LlamaDecoderLayer`, embeddings, norm, head) and fills them with only its own tensors, read from the
checkpoint's safetensors files (through the index when the checkpoint is sharded), so a 4-stage 7B model
never holds more than a quarter of the weights in one process.

A step is continuous batching over packed sequences: each request of a batch is one sequence's new tokens
(a prompt to prefill, or one decode token), all concatenated into one [tokens, hidden] matrix, so the
projections and the MLP (where the weights are read) run once for the whole batch. The KV caches live in one
pool per layer, a row per sequence, so the decode tokens of a batch (the common step) attend in one batched
call, each masked to its own length; only a prompt (several new tokens) attends on its own. A sequence may
join or leave at any step.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from safetensors import safe_open
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

CACHE_BLOCK = 128  # KV cache positions allocated at a time per sequence and layer


class StageError(ValueError):
    """A request this stage cannot serve (its message is returned to the caller)."""


def stage_layers(num_layers: int, stage: int, stages: int) -> range:
    """The decoder layers of stage `stage` (0-based) of `stages`: contiguous, as even as the count allows."""
    if not 0 <= stage < stages <= num_layers:
        raise StageError(f"stage {stage} of {stages} is impossible for {num_layers} layers")
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def parse_stage_name(model_name: str) -> tuple[int, int]:
    """`llm_2of4` -> (1, 4): Triton knows the model by its directory name, which says which stage it is."""
    try:
        stage, stages = model_name.rsplit("_", 1)[1].split("of")
        return int(stage) - 1, int(stages)
    except (IndexError, ValueError):
        raise StageError(f"model name '{model_name}' does not end in _<stage>of<stages> (e.g. llm_1of2)") from None


def _checkpoint_files(checkpoint: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: checkpoint / file for name, file in weight_map.items()}
    single = checkpoint / "model.safetensors"
    if not single.is_file():
        raise StageError(f"{checkpoint} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has keys(), not iteration)


def _load_tensors(checkpoint: Path, wanted: list[str], device: str) -> dict[str, torch.Tensor]:
    files = _checkpoint_files(checkpoint)
    missing = [name for name in wanted if name not in files]
    if missing:
        raise StageError(f"checkpoint {checkpoint} lacks {len(missing)} tensors, e.g. {missing[0]}")
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({files[name] for name in wanted}):
        with safe_open(file, framework="pt", device=device) as f:
            for name in wanted:
                if files[name] == file:
                    tensors[name] = f.get_tensor(name)
    return tensors


def _filled(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    state = {key[len(prefix):]: value.to(dtype) for key, value in tensors.items() if key.startswith(prefix)}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


@dataclass
class SequenceCache:
    """Where one sequence's keys and values are: its row of the KV pool, whose first `length` positions are
    filled at every layer of this stage."""

    row: int
    length: int = 0
    last_used: float = 0.0


class KVPool:
    """The keys and values of every sequence at every layer: per layer two [rows, kv_heads, capacity, head_dim]
    tensors, a row per sequence in flight. Rows are as many as the stage admits sequences; the capacity grows
    in blocks of CACHE_BLOCK positions to the longest sequence in flight (a copy every block, not every
    token), so memory follows what is in flight, not the model's maximum."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int) -> None:
        self.layers, self.rows, self.kv_heads, self.head_dim = layers, rows, kv_heads, head_dim
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.free_rows = list(range(rows - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, positions: int, like: torch.Tensor) -> None:
        """Make room for `positions` positions in every row (`like` gives the dtype and device)."""
        if positions <= self.capacity:
            return
        capacity = -(-positions // CACHE_BLOCK) * CACHE_BLOCK
        old = self.capacity

        def grown(buffer: torch.Tensor | None) -> torch.Tensor:
            # zeros, not empty: a masked position still enters the batched product, and 0 x NaN is NaN
            new = like.new_zeros(self.rows, self.kv_heads, capacity, self.head_dim)
            if buffer is not None:
                new[:, :, :old] = buffer
            return new

        self.keys = [grown(self.keys[i] if self.keys else None) for i in range(self.layers)]
        self.values = [grown(self.values[i] if self.values else None) for i in range(self.layers)]


@dataclass
class StepInput:
    sequence_id: int
    start: bool          # a new sequence: its old cache (if any) is dropped
    end: bool            # its last step here: the cache is freed after it
    tokens: torch.Tensor  # [T] token ids (first stage) or [T, hidden] activations (other stages)


class PipelineStage:
    def __init__(self, checkpoint: Path, stage: int, stages: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_sequences: int = 64, idle_timeout_s: float = 300.0,
                 max_positions: int = 0) -> None:
        checkpoint = Path(checkpoint)
        self.config = LlamaConfig.from_pretrained(checkpoint)
        self.config._attn_implementation = "sdpa"
        self.layer_ids = stage_layers(self.config.num_hidden_layers, stage, stages)
        # the positions a sequence may reach: what the KV cache was sized for (0: all the model knows)
        self.max_positions = min(self.config.max_position_embeddings, max_positions or 1 << 62)
        self.first, self.last = stage == 0, stage == stages - 1
        self.device, self.dtype = device, dtype
        self.max_sequences, self.idle_timeout_s = max_sequences, idle_timeout_s
        self.caches: dict[int, SequenceCache] = {}
        self._load(checkpoint)
        attention = self.layers[0].self_attn
        self.pool = KVPool(len(self.layers), max_sequences, self.config.num_key_value_heads, attention.head_dim)

    def _load(self, checkpoint: Path) -> None:
        config = self.config
        wanted = [f"model.layers.{i}.{name}" for i in self.layer_ids
                  for name in _layer_tensor_names(config)]
        if self.first:
            wanted.append("model.embed_tokens.weight")
        if self.last:
            wanted += ["model.norm.weight",
                       "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
        tensors = _load_tensors(checkpoint, sorted(set(wanted)), self.device)
        with torch.device("meta"):
            layers = [LlamaDecoderLayer(config, i) for i in self.layer_ids]
            embed = torch.nn.Embedding(config.vocab_size, config.hidden_size) if self.first else None
            norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if self.last else None
            head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False) if self.last else None
        self.layers = [_filled(layer, f"model.layers.{i}.", tensors, self.dtype)
                       for layer, i in zip(layers, self.layer_ids, strict=True)]
        if embed is not None:
            self.embed = _filled(embed, "model.embed_tokens.", tensors, self.dtype)
        if norm is not None and head is not None:
            self.norm = _filled(norm, "model.norm.", tensors, self.dtype)
            head_prefix = "model.embed_tokens." if config.tie_word_embeddings else "lm_head."
            self.head = _filled(head, head_prefix, tensors, self.dtype)
        self.rotary = LlamaRotaryEmbedding(config).to(self.device)

    # --- the KV caches ----------------------------------------------------------------------------------------
    def _cache_for(self, item: StepInput, now: float) -> SequenceCache:
        if item.start:
            self._drop(item.sequence_id)
        cache = self.caches.get(item.sequence_id)
        if cache is None:
            if not item.start:
                raise StageError(f"sequence {item.sequence_id} is unknown here (not started, ended, or evicted)")
            if not self.pool.free_rows:
                raise StageError(f"KV cache full: {self.max_sequences} sequences in flight at this stage")
            cache = self.caches[item.sequence_id] = SequenceCache(self.pool.free_rows.pop())
        cache.last_used = now
        return cache

    def _drop(self, sequence_id: int) -> None:
        cache = self.caches.pop(sequence_id, None)
        if cache is not None:
            self.pool.free_rows.append(cache.row)

    def evict_idle(self, now: float) -> list[int]:
        """Drop the caches of sequences whose driver went away (no step for `idle_timeout_s`)."""
        idle = [sid for sid, cache in self.caches.items() if now - cache.last_used > self.idle_timeout_s]
        for sid in idle:
            self._drop(sid)
        return idle

    # --- one batched step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, batch: list[StepInput]) -> list[torch.Tensor | StageError]:
        """Advance every sequence of `batch` by its new tokens.

        Returns, per input, [T, hidden] activations for the next stage, or (last stage) the greedy next token
        as a [1] tensor, or the StageError that sequence met (the others still step).
        """
        now = time.monotonic()
        self.evict_idle(now)
        results: list[torch.Tensor | StageError] = [StageError("not stepped")] * len(batch)
        live: list[tuple[int, StepInput, SequenceCache]] = []
        for index, item in enumerate(batch):
            try:
                if len(item.tokens) == 0:  # a release: the driver stopped early
                    if not item.end:
                        raise StageError("an empty step must be a release (end flag)")
                    self._drop(item.sequence_id)
                    results[index] = torch.zeros(0, dtype=torch.int64)
                    continue
                cache = self._cache_for(item, now)
                if cache.length + len(item.tokens) > self.max_positions:
                    raise StageError(f"sequence {item.sequence_id} would exceed {self.max_positions} positions")
                live.append((index, item, cache))
            except StageError as error:
                results[index] = error
        if not live:
            return results
        outputs = self._forward([item for _, item, _ in live], [cache for _, _, cache in live])
        for (index, item, _), output in zip(live, outputs, strict=True):
            results[index] = output
            if item.end:
                self._drop(item.sequence_id)
        return results

    def _forward(self, items: list[StepInput], caches: list[SequenceCache]) -> list[torch.Tensor]:
        lengths = [len(item.tokens) for item in items]
        if self.first:
            hidden = self.embed(torch.cat([item.tokens.to(self.device) for item in items]))
        else:
            hidden = torch.cat([item.tokens.to(self.device, self.dtype) for item in items])
        positions = torch.cat([torch.arange(c.length, c.length + n, device=self.device)
                               for c, n in zip(caches, lengths, strict=True)])
        cos, sin = self.rotary(hidden, positions[None])
        self.pool.reserve(max(c.length + n for c, n in zip(caches, lengths, strict=True)), hidden)
        layout = StepLayout(caches, lengths, self.device)
        for slot, layer in enumerate(self.layers):
            residual = hidden
            attention = self._attention(layer, slot, layer.input_layernorm(hidden), cos, sin, layout)
            hidden = residual + attention
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        for cache, n in zip(caches, lengths, strict=True):
            cache.length += n
        pieces = list(torch.split(hidden, lengths))
        if not self.last:
            return pieces
        final = self.norm(torch.stack([piece[-1] for piece in pieces]))
        return list(self.head(final).argmax(dim=-1, keepdim=True).to(torch.int64).unbind(0))

    def _attention(self, layer: LlamaDecoderLayer, slot: int, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        attn = layer.self_attn
        tokens, head_dim = x.shape[0], attn.head_dim
        q = attn.q_proj(x).view(tokens, -1, head_dim).transpose(0, 1)[None]   # [1, heads, tokens, dim]
        k = attn.k_proj(x).view(tokens, -1, head_dim).transpose(0, 1)[None]   # [1, kv_heads, tokens, dim]
        v = attn.v_proj(x).view(tokens, -1, head_dim).transpose(0, 1)[None]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        pool_keys, pool_values = self.pool.keys[slot], self.pool.values[slot]
        out = x.new_empty(tokens, q.shape[1] * head_dim)
        if layout.decode_tokens is not None:  # one new token per sequence: all of them in one call
            rows, past, at = layout.decode_rows, layout.decode_past, layout.decode_tokens
            pool_keys[rows, :, past] = k[0, :, at].transpose(0, 1)      # [sequences, kv_heads, dim]
            pool_values[rows, :, past] = v[0, :, at].transpose(0, 1)
            seen = layout.decode_seen
            keys, values = pool_keys[rows, :, :seen], pool_values[rows, :, :seen]  # [sequences, kv_heads, seen, dim]
            query = q[0, :, at].transpose(0, 1)[:, :, None]              # [sequences, heads, 1, dim]
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=layout.decode_mask,
                                                      scale=attn.scaling, enable_gqa=True)
            out[at] = attended.flatten(1)
        for row, past, offset, n in layout.prompts:  # several new tokens: causal over its own row
            pool_keys[row, :, past:past + n] = k[0, :, offset:offset + n]
            pool_values[row, :, past:past + n] = v[0, :, offset:offset + n]
            seen = past + n
            attended = F.scaled_dot_product_attention(
                q[:, :, offset:offset + n], pool_keys[row:row + 1, :, :seen], pool_values[row:row + 1, :, :seen],
                **_causal(past, n, x.device), scale=attn.scaling, enable_gqa=True)
            out[offset:offset + n] = attended[0].transpose(0, 1).reshape(n, -1)
        return attn.o_proj(out)


class StepLayout:
    """Where each sequence's new tokens sit in a step's packed batch, worked out once for every layer: the
    decode tokens (one per sequence) with their pool rows, cached lengths and the mask that limits each to its
    own length, and the prompts (several tokens) one by one."""

    def __init__(self, caches: list[SequenceCache], lengths: list[int], device: str) -> None:
        offsets = [0, *itertools.accumulate(lengths)][:-1]
        decodes = [(c.row, c.length, offset) for c, n, offset in zip(caches, lengths, offsets, strict=True) if n == 1]
        self.prompts = [(c.row, c.length, offset, n)
                        for c, n, offset in zip(caches, lengths, offsets, strict=True) if n > 1]
        self.decode_tokens: torch.Tensor | None = None
        if decodes:
            rows, past, at = (torch.tensor(column, device=device) for column in zip(*decodes, strict=True))
            self.decode_rows, self.decode_past, self.decode_tokens = rows, past, at
            self.decode_seen = max(length for _, length, _ in decodes) + 1
            # sequence i sees positions 0..past[i] (its own new token included): [sequences, 1, 1, seen]
            self.decode_mask = (torch.arange(self.decode_seen, device=device)[None, :] <= past[:, None])[:, None, None]


def _causal(past: int, new: int, device: torch.device) -> dict:
    """SDPA's causal arguments for a prompt of `new` tokens after `past` cached positions: query t (at position
    past+t) sees keys 0..past+t. A fresh prompt is plain causal: no mask to build for it."""
    if past == 0:
        return {"is_causal": True}
    visible = torch.arange(past + new, device=device)[None, :] <= past + torch.arange(new, device=device)[:, None]
    return {"attn_mask": visible}


def _layer_tensor_names(config: LlamaConfig) -> list[str]:
    names = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    if getattr(config, "attention_bias", False):
        names += [f"self_attn.{p}_proj.bias" for p in "qkvo"]
    names += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    if getattr(config, "mlp_bias", False):
        names += [f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
    return names + ["input_layernorm.weight", "post_attention_layernorm.weight"]

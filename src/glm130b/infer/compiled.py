"""The compiled decode step (gpt-fast's recipe): one token per row through the whole model as
one `torch.compile`d function over a static KV cache.

Eager decoding launches hundreds of small kernels per token, and on a GPU the launches, not the
weights' reads, set the speed of a batch-1 step. Compiled with `mode="reduce-overhead"` the step
becomes one CUDA graph replayed every token; on the CPU inductor fuses the element-wise work.
What makes one graph possible is the cache (model/kv_cache.StaticKVCache): each step writes at
slots held in a device tensor and attends every slot with the mask hiding the unused ones, so
the shapes never change. One graph is compiled per number of rows (the serving batcher's live
rows vary; the recompile limit is raised to cover them).

The prefill stays eager (SDPA under GLM's mask: its length changes every request). If compiling
fails (no C++ compiler for inductor, an unsupported op) the step says so once and runs the same
static-cache step eagerly.
"""

from __future__ import annotations

import collections
import os
import sys
import weakref

import torch
from torch.distributed.tensor import DTensor

from glm130b.errors import GLMError
from glm130b.model.masks import step_allowed

MODE_ENV = "GLM130B_COMPILE_MODE"
CACHE_ROUND = 256  # static cache lengths are rounded up to a multiple: a few shapes, a few graphs
POOL_SIZE = 4  # static caches kept per model (the most recently used shapes)
_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(rows, len, dtype): cache}


def static_cache(model, rows: int, max_len: int, dtype: torch.dtype):
    """The model's static cache of `rows` x `max_len` (rounded up to CACHE_ROUND), emptied: one
    per shape, reused by every generation, since each new length would compile the step again
    and each new cache would record its CUDA graph again (cudagraph trees stop recording after a
    while and silently run without graphs)."""
    length = -(-max_len // CACHE_ROUND) * CACHE_ROUND
    pool = _caches.setdefault(model, collections.OrderedDict())
    key = (rows, length, dtype)
    if key in pool:
        pool.move_to_end(key)
    else:
        while len(pool) >= POOL_SIZE:  # the least recently used shape goes (its memory with it)
            pool.popitem(last=False)
        pool[key] = model.new_kv_cache(rows, length, dtype, static=True)
    return pool[key].reset()


_compiled: dict = {}  # mode -> the compiled decode_one
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "eager")


def default_mode(device: torch.device) -> str:
    """CUDA graphs on a GPU (the launch overhead is what compiling removes there), inductor's
    default elsewhere; $GLM130B_COMPILE_MODE overrides ("eager": no compiling)."""
    mode = os.environ.get(MODE_ENV) or ("reduce-overhead" if device.type == "cuda" else "default")
    if mode not in MODES:
        raise GLMError(f"${MODE_ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


# The columns of a step's one input tensor (int64 [B, 5], or [B, 6] with 2D rotary).
TOKEN, CONTEXT, PART_B, SLOT, POSITION = range(5)  # (then BLOCK_POSITION, 2D only)


def step_inputs(tokens, contexts, generated_from, slots, positions: torch.Tensor) -> torch.Tensor:
    """The step's inputs packed into one int64 tensor on the host, so a step costs one small
    copy to the device instead of a handful of copies and mask kernels: each row's token, context
    length, Part-B start, cache slot, and position (and block position): masks.step_allowed and
    masks.step_positions are computed from them inside the compiled step."""
    rows = positions.shape[0]

    def col(x):  # a number, a list or a tensor (tokens may come back from the device)
        x = x.cpu() if isinstance(x, torch.Tensor) else x
        return torch.as_tensor(x, dtype=torch.long).reshape(-1, 1).expand(rows, 1)

    return torch.cat((col(tokens), col(contexts), col(generated_from), col(slots), positions.reshape(rows, -1)), 1)


def decode_one(model, packed: torch.Tensor, cache) -> torch.Tensor:
    """FP32 logits [B, V] of one token per row, written into the static cache at the slots
    `cache.write_at`; `packed` as step_inputs made it (under tensor parallelism the vocabulary
    slices are gathered inside the step)."""
    allowed = step_allowed(packed[:, CONTEXT], packed[:, PART_B], packed[:, SLOT], cache.max_len, packed.device)
    positions = packed[:, POSITION:]  # [B, 1], or [B, 2] -> [B, 2, 1] (= masks.step_positions)
    positions = positions if positions.shape[1] == 1 else positions.unsqueeze(-1)
    h = model.run_blocks(model.embed(packed[:, TOKEN:TOKEN + 1]), positions, allowed, cache)
    logits = model.head(model.final_layernorm(h[:, 0]))
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return logits.float()


class CompiledDecoder:
    def __init__(self, model, mode: str | None = None):
        self.model = model
        device = model.final_layernorm.weight.device
        self.mode = mode or default_mode(device)
        if self.mode not in MODES:
            raise GLMError(f"compile mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.device, self.cuda = device, device.type == "cuda"
        self.fn = decode_one
        if self.mode != "eager":
            import torch._dynamo

            # one graph per row count: up to a server's whole batch
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            if self.cuda:  # as gpt-fast: inductor fuses a batch-1 product (and INT8's cast into it)
                import torch._inductor.config  # into its own tuned kernel only with this on

                torch._inductor.config.coordinate_descent_tuning = True
            if self.mode not in _compiled:  # one wrapper per mode: every engine reuses its graphs
                _compiled[self.mode] = torch.compile(decode_one, mode=self.mode, dynamic=False)
            self.fn = _compiled[self.mode]
        self.failed: str | None = None

    @torch.no_grad()
    def step(self, packed: torch.Tensor, cache, logits: bool = True) -> torch.Tensor | None:
        """Engine.step's contract for a decode step (`packed`: step_inputs on the host): advance
        the cache by one, return FP32 logits [B, V] (a copy: a CUDA graph's output is
        overwritten by its next replay), or None."""
        cache.check_room(1)
        packed = packed.to(self.device, non_blocking=True)
        cache.write_at = packed[:, SLOT]
        try:
            out = self._run(packed, cache)
        finally:
            cache.write_at = None
        cache.advance(1)
        return out.clone() if logits else None

    def _run(self, packed, cache) -> torch.Tensor:
        if self.fn is not decode_one:
            try:
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                return self.fn(self.model, packed, cache)
            except Exception as e:  # noqa: BLE001 - a compiler failure must not end the generation
                if not _is_compile_failure(e):
                    raise
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"glm130b: torch.compile of the decode step failed ({self.failed[:200]}); "
                      "decoding eagerly", file=sys.stderr)
                self.fn = decode_one
        return decode_one(self.model, packed, cache)


def _is_compile_failure(e: Exception) -> bool:
    """Errors raised by dynamo/inductor themselves (not a model error such as a full cache)."""
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "BackendCompilerFailed" in type(e).__name__ \
        or isinstance(e, (OSError, ImportError))

"""The app's side: a text GGUF plus an mmproj, run by llama.cpp's mtmd, as the phone runs it.

This drives the low-level mtmd API on purpose. llama-cpp-python's chat
handlers apply the GGUF chat template (`User: <__media__>`...) and sample with
temperature 0.2, top-k 40, min-p 0.05 and a repeat penalty by default; the app
sends the raw prompt and decodes greedily. Here the prompt goes in verbatim,
the canvas goes in as raw RGB (no file decoding in between) and decoding is the
contract's.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp
from PIL import Image

from src.config.contract import Generation


@llama_cpp.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs to stderr regardless of `verbose`; this callback drops it."""


def silence() -> None:
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(_quiet, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_quiet, ctypes.c_void_p(0))


@dataclass(frozen=True)
class Chunk:
    """One mtmd chunk: text token ids, or an image of `n_tokens` positions."""

    kind: str  # "text" | "image"
    tokens: tuple[int, ...]
    n_tokens: int


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: tuple[int, ...]
    first_logits: np.ndarray  # next-token logits after the prompt, over the whole vocabulary
    stopped: bool  # an end-of-generation token came within max_new_tokens


class LlamaVLM:
    """A loaded text GGUF + mmproj. Use as a context manager; frees the mtmd context on exit."""

    def __init__(self, text_gguf: Path, mmproj_gguf: Path, n_ctx: int = 4096, n_threads: int | None = None):
        silence()
        # OMP_NUM_THREADS sets llama.cpp's threads as it sets torch's: the answers must not depend on it
        # (each output of a ggml matmul is summed by one thread), and tests/pipeline/test_runtime_build.py checks they do not.
        n_threads = n_threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None
        self.llm = llama_cpp.Llama(model_path=str(text_gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=n_threads, logits_all=False, verbose=False)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        if n_threads:
            params.n_threads = n_threads
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_gguf).encode(), self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"mtmd could not load {mmproj_gguf} for {text_gguf}")
        self.n_batch = n_ctx

    def __enter__(self) -> LlamaVLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.ctx:
            mtmd_cpp.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    @staticmethod
    def marker() -> str:
        """The media marker of this llama.cpp build (it changed upstream; never hard-code it)."""
        return mtmd_cpp.mtmd_default_marker().decode()

    def _tokenize(self, prompt: str, canvas: Image.Image) -> ctypes.c_void_p:
        rgb = np.ascontiguousarray(np.asarray(canvas.convert("RGB"), dtype=np.uint8))
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd_cpp.mtmd_bitmap_init(canvas.width, canvas.height, buf)
        text = mtmd_cpp.mtmd_input_text()
        raw = prompt.encode()
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mtmd_cpp.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        if rc != 0:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            raise ValueError(f"mtmd_tokenize failed ({rc}): the prompt must hold the marker {self.marker()!r} once")
        return chunks

    def _chunks(self, chunks: ctypes.c_void_p) -> list[tuple[Chunk, ctypes.c_void_p]]:
        out = []
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            c = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(c) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                ids = tuple(ptr[j] for j in range(n.value))
                out.append((Chunk("text", ids, len(ids)), c))
            else:
                out.append((Chunk("image", (), mtmd_cpp.mtmd_input_chunk_get_n_tokens(c)), c))
        return out

    def layout(self, prompt: str, canvas: Image.Image) -> list[Chunk]:
        """How llama.cpp lays out prompt + image: the token-layout rung compares this."""
        chunks = self._tokenize(prompt, canvas)
        try:
            return [ch for ch, _ in self._chunks(chunks)]
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)

    def _prefill(self, prompt: str, canvas: Image.Image) -> int:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        chunks = self._tokenize(prompt, canvas)
        try:
            n_past = llama_cpp.llama_pos(0)
            for _, c in self._chunks(chunks):
                # the text path adds to *new_n_past, the image path sets it: start it at n_past
                new_past = llama_cpp.llama_pos(n_past.value)
                rc = mtmd_cpp.mtmd_helper_eval_chunk_single(self.ctx, self.llm._ctx.ctx, c, n_past, 0, self.n_batch,
                                                            True, ctypes.byref(new_past))
                if rc != 0:
                    raise RuntimeError(f"mtmd_helper_eval_chunk_single failed ({rc})")
                n_past = new_past
            return n_past.value
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)

    def _logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def first_logits(self, prompt: str, canvas: Image.Image) -> np.ndarray:
        self._prefill(prompt, canvas)
        return self._logits()

    def eog_ids(self) -> list[int]:
        """Every token this vocabulary ends generation at (`llama_vocab_is_eog`), not only the GGUF's EOS.

        llama.cpp marks SmolLM2's `<|im_end|>` and `<|endoftext|>` as end-of-generation besides the
        contract's `<end_of_utterance>`: the app stops at any of them, so the reference must too.
        """
        vocab = self.llm._model.vocab
        return [t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]

    def generate(self, prompt: str, canvas: Image.Image, gen: Generation, grammar: str | None = None,
                 stop_at_eos: bool = True) -> Answer:
        """Decode as the app does. Only greedy is implemented, so the contract must say greedy.

        `grammar` (GBNF text, see src/runtime/grammar.py) constrains every step to what it admits, with
        llama.cpp's grammar sampler; None (the default) decodes unconstrained. `stop_at_eos=False`
        runs the whole max_new_tokens budget (the benchmark's cost of an EOS that never comes).
        """
        if not gen.greedy:
            raise ValueError(f"only greedy decoding is reproducible for parity; contract.generation={gen}")
        n_past = self._prefill(prompt, canvas)
        logits = first = self._logits()
        vocab = self.llm._model.vocab
        tokens: list[int] = []
        stopped = False
        constraint = None
        if grammar is not None:
            from src.runtime.grammar import Constraint  # only constrained decoding needs it

            constraint = Constraint(vocab, grammar, self.llm.n_vocab())
        for _ in range(gen.max_new_tokens):
            tok = int(np.argmax(logits if constraint is None else constraint.mask(logits)))
            if stop_at_eos and llama_cpp.llama_vocab_is_eog(vocab, tok):
                stopped = True
                break
            if constraint is not None:
                constraint.accept(tok)
            tokens.append(tok)
            batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(tok), 1)
            if llama_cpp.llama_decode(self.llm._ctx.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            n_past += 1
            logits = self._logits()
        if constraint is not None:
            constraint.close()
        text = self.llm.detokenize(tokens, special=False).decode("utf-8", errors="replace")
        return Answer(text=text, tokens=tuple(tokens), first_logits=first, stopped=stopped)


def expand(chunks: list[Chunk], image_token_id: int) -> list[int]:
    """llama.cpp's layout as one id list, image positions written as the HF image token."""
    ids: list[int] = []
    for c in chunks:
        ids.extend(c.tokens if c.kind == "text" else [image_token_id] * c.n_tokens)
    return ids





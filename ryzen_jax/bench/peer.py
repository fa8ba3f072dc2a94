"""The peer: Hugging Face transformers (PyTorch) on the same checkpoint, prompts, batch
and new-token count, greedy, as its users run it (``model.generate``; on the GPU when
ours runs on one and PyTorch sees it, else on the CPU with PyTorch's default thread
count). Optional: :func:`available` says whether torch is installed.

Per-token times come from a streamer that stamps each step's tokens as ``generate``
hands them over (one ``put`` per step on CPU); the prompt's own ``put`` starts the clock.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Sequence

import numpy as np

from ryzen_jax.bench.stats import median, summary_ms


def available() -> bool:
    """True when torch and transformers' PyTorch models can run here."""
    return importlib.util.find_spec("torch") is not None


@dataclasses.dataclass
class PeerRun:
    """Hugging Face transformers at one batch size. Times in ms, rates per second."""

    batch: int
    ttft_ms: float
    token_latency_ms: dict[str, float]
    e2e_ms: float
    tokens_per_s: float
    decode_tokens_per_s: float
    decode_step_ms: float  # mean gap between tokens after the first
    torch_threads: int
    device: str  # where PyTorch ran it: "cpu" or "cuda:0"
    generated_ids: list[list[int]]
    token_latency_samples_ms: list[float]


class _Stamps:
    """A ``generate`` streamer that only records when each step's tokens arrive."""

    def __init__(self, sync=None):
        self.times: list[float] = []
        self.sync = sync  # on a GPU: wait for the step's kernels, so a stamp is when its token exists

    def put(self, value) -> None:
        if self.sync is not None:
            self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def peer_device(backend: str) -> str:
    """Where the peer runs: the GPU when ours runs on one (``backend`` "gpu") and
    PyTorch sees a CUDA device, else the CPU — the same hardware as ours, as a user of
    either would run it."""
    import torch

    return "cuda:0" if backend == "gpu" and torch.cuda.is_available() else "cpu"


class Peer:
    """A Hugging Face model loaded once from ``path`` (an HF directory), in ``dtype``,
    on ``device`` (see :func:`peer_device`)."""

    def __init__(self, path: str, dtype: str = "float32", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.torch = torch
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else None

    def generate(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> tuple[float, list[float], list[list[int]]]:
        """One greedy run of exactly ``new_tokens`` per row: (seconds to the first new token,
        step times after it, the generated ids)."""
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        streamer = _Stamps(self._sync)
        with torch.inference_mode():
            if self._sync is not None:
                self._sync()
            t0 = time.perf_counter()
            # eos_token_id=None: no stop, and EOS may be generated like any token, as ours
            # runs (ignore_eos); min_new_tokens would instead forbid EOS and change the tokens
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0,
                                      streamer=streamer)
        stamps = streamer.times[1:]  # the first put is the prompt
        return stamps[0] - t0, list(np.diff(stamps)), out[:, ids.shape[1]:].tolist()

    def measure(self, prompts: Sequence[Sequence[int]], new_tokens: int, *, repeats: int = 3) -> PeerRun:
        """Every figure at this batch: median of ``repeats`` runs after one warm-up run."""
        self.generate(prompts, new_tokens)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ttft, gaps, ids = self.generate(prompts, new_tokens)
            runs.append((time.perf_counter() - t0, ttft, gaps, ids))
        batch = len(prompts)
        e2e = median([r[0] for r in runs])
        decode = median([r[0] - r[1] for r in runs])
        all_gaps = [g for r in runs for g in r[2]]
        return PeerRun(batch=batch, ttft_ms=median([r[1] for r in runs]) * 1e3, token_latency_ms=summary_ms(all_gaps),
                       e2e_ms=e2e * 1e3, tokens_per_s=batch * new_tokens / e2e,
                       decode_tokens_per_s=batch * (new_tokens - 1) / decode,
                       decode_step_ms=decode / (new_tokens - 1) * 1e3, torch_threads=self.torch.get_num_threads(),
                       device=str(self.device),
                       generated_ids=runs[-1][3], token_latency_samples_ms=[g * 1e3 for g in all_gaps])

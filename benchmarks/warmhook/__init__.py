"""Experiment (benchmarks only, not in the presets): build vLLM's Hugging Face processor while the
engine starts instead of at its first request.

vLLM's AsyncLLM, which Ray Data LLM's engine actor runs, builds the processor for its renderer's
tokenizer at the first multimodal request: 10 s of the actor's CPU in AsyncLLM on the project's
2-core machine, 16-23 s of idle GPU on the H200 (see the notebook's "Where a start-up goes").
vllm.LLM avoids it by calling renderer.warmup() at start; AsyncLLM does not (vLLM 0.26 and 0.29).
This hook makes AsyncLLM do the same, in a thread that overlaps the engine core's start-up, and
joins it before the constructor returns, so no request can race it. It wraps two of vLLM's private
constructors (AsyncLLM, InputProcessor), which is why it is an experiment and not the preset.

Used by `bench_vision.py --warm-renderer`: ray.init(runtime_env={"py_modules": [this folder, ...],
"worker_process_setup_hook": "warmhook.install"}). Nothing is patched until a worker imports
vLLM's AsyncLLM; processes that never do pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import threading
import time

logger = logging.getLogger(__name__)
_TARGET = "vllm.v1.engine.async_llm"


def _patch(async_llm_module) -> None:
    from vllm.renderers.params import ChatParams
    from vllm.v1.engine.input_processor import InputProcessor

    async_llm = async_llm_module.AsyncLLM
    if getattr(async_llm, "_warmhook", False):
        return
    local = threading.local()
    llm_init, ip_init = async_llm.__init__, InputProcessor.__init__

    def warm(renderer) -> None:
        start = time.perf_counter()
        try:
            renderer.warmup(ChatParams())  # what vllm.LLM.__init__ calls
        except Exception:  # a failed warm-up only means the first request pays, as before
            logger.warning("warmhook: vLLM renderer warm-up failed", exc_info=True)
        print(f"warmhook: vLLM renderer warm-up took {time.perf_counter() - start:.1f} s", flush=True)

    def patched_ip_init(self, *args, **kwargs):
        ip_init(self, *args, **kwargs)
        # Only the InputProcessor that AsyncLLM builds (its renderer serves the requests): start
        # now, while AsyncLLM goes on to start the engine core.
        if getattr(local, "in_async_llm", False) and getattr(local, "pending", None) is None:
            local.pending = threading.Thread(target=warm, args=(self.renderer,), daemon=True)
            local.pending.start()

    def patched_llm_init(self, *args, **kwargs):
        local.in_async_llm, local.pending = True, None
        try:
            llm_init(self, *args, **kwargs)
        finally:
            local.in_async_llm = False
            if local.pending is not None:
                start = time.perf_counter()
                local.pending.join()
                print(f"warmhook: joined after {time.perf_counter() - start:.1f} s more", flush=True)
            local.pending = None

    InputProcessor.__init__ = patched_ip_init
    async_llm.__init__ = patched_llm_init
    async_llm._warmhook = True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _patch(module)

            spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Ray's worker_process_setup_hook: patch AsyncLLM now if it is imported, else when it is."""
    if _TARGET in sys.modules:
        _patch(sys.modules[_TARGET])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())

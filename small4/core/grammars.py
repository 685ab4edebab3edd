"""The engine core's grammar masks: a request's ``GrammarSpec`` compiled here, off the step loop.

In one process the server hands the engine a ready ``TokenMaskFactory`` (a closure over its compiled grammar); a
closure cannot cross to the core, so the spec (the lark text) does and the core compiles it again with its own
``GrammarCompiler`` (chat/grammar.py: llguidance over the model's tekken tokenizer, cached, time-limited). The
compile runs on a worker thread (llguidance drops the GIL) so the core keeps stepping the other requests; the
request joins the engine when its grammar is ready. This module is the core's, not the engine's: ``engine/``
never imports ``chat/``.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from small4.engine.token_mask import GrammarMaskFactory, GrammarSpec, token_mask_provider


class CoreGrammars:
    def __init__(self, tokenizer: Any, vocab_size: int, max_workers: int = 2) -> None:
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="small4-core-grammar")

    def submit(self, spec: GrammarSpec) -> Future[GrammarMaskFactory]:
        """The factory for ``spec``, built on a worker; the future raises ``GrammarError`` (a ValueError) for a
        grammar that does not compile in time."""
        return self._pool.submit(self._factory, spec)

    def _factory(self, spec: GrammarSpec) -> GrammarMaskFactory:
        compiler = self._get_compiler()
        compiled = compiler.compile(spec.grammar)
        make = compiler.triggered_matcher if spec.triggered else compiler.matcher
        vocab = self._vocab_size
        return GrammarMaskFactory(spec, lambda: token_mask_provider(make(compiled), vocab))

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                from small4.chat.grammar import GrammarCompiler

                self._compiler = GrammarCompiler(self._tokenizer.mistral)
            return self._compiler

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._compiler is not None:
            self._compiler.close()

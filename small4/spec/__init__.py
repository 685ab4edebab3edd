"""Speculative decoding: the EAGLE draft head (``eagle``), its loading (``loading``), and the runtime that proposes,
verifies and accepts draft tokens inside the engine's step."""

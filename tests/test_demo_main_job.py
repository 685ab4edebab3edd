"""The README's main job (`small4 demo`) end to end: a real `small4 serve` process on the embedded model, the
openai client's requests, SIGTERM, exit 0; under the latency profile the answers come through speculative decoding
with the demo model's shipped draft, which must be accepted most of the time."""

from __future__ import annotations

import re

from small4.demo import main


def test_main_job_answers_speculates_and_stops_cleanly(capsys):
    assert main() == 0
    out = capsys.readouterr().out
    assert "chat:        'Hello! How can I help you today?'" in out
    assert "tool call:   get_weather(" in out
    assert "server stopped with exit code 0" in out
    spec = re.search(r"speculative: (\d+) verify steps, acceptance ([\d.]+), ([\d.]+) tokens per step", out)
    assert spec, out
    assert int(spec.group(1)) > 0
    assert float(spec.group(2)) >= 0.6  # v2 model and draft: 0.72 on 60 held-out prompts
    assert float(spec.group(3)) >= 2.5  # 3.16 at k = 3 there

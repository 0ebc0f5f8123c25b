"""`fapool generate`: a single completion streams to the terminal as it is generated, and what
streams is the completion itself; LLM.generate's on_output hook behind it."""

import itertools
import json

from fapool import LLM, SamplingParams
from fapool.entrypoints.cli import main

ARGS = ["--device", "cpu", "--num-kv-blocks", "64", "--block-size", "4", "--max-tokens", "12", "--ignore-eos"]


def test_on_output_sees_growing_text_then_the_final_output(tiny_text_model):
    llm = LLM(tiny_text_model, device="cpu", num_kv_blocks=64, block_size=4)
    seen = []
    outs = llm.generate(["hello there"], SamplingParams(max_tokens=12, ignore_eos=True), on_output=seen.append)
    texts = [o.outputs[0].text for o in seen]
    assert len(seen) >= 12  # one call per step at least (prefill, then each token)
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert seen[-1].finished and not any(o.finished for o in seen[:-1])
    assert texts[-1] == outs[0].outputs[0].text


def test_generate_streams_the_completion(tiny_text_model, capsys):
    assert main(["generate", "--model", tiny_text_model, *ARGS, "--prompt", "hello there", "--json"]) == 0
    final = json.loads(capsys.readouterr().out)["completions"][0]["text"]
    assert main(["generate", "--model", tiny_text_model, *ARGS, "--prompt", "hello there"]) == 0
    out = capsys.readouterr().out
    assert final and out.count(final) == 1  # streamed once, not printed again at the end
    assert "TTFT" in out and "TPOT" in out

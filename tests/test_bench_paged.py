"""The PagedAttention peer of the KV benchmarks (bench/paged_peer.py) on a tiny model on CPU:
the tokens it reports are greedy generate()'s for each prompt, every request runs its tokens,
and a decode time that cannot be measured is said, not turned into a speed."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_models import prompt, tiny_model  # noqa: E402

from bench.paged_peer import run_paged  # noqa: E402


def _sizes_its_cache_on_cpu() -> bool:
    """Before transformers 5.24 continuous batching sizes its cache on CPU from psutil (without
    it: "Invalid values: max_batch_tokens = 256, num_blocks = -2"); on a GPU from CUDA."""
    import importlib.util

    from packaging.version import Version

    return Version(transformers.__version__) >= Version("5.24") or importlib.util.find_spec("psutil") is not None


@pytest.mark.skipif(not _sizes_its_cache_on_cpu(), reason="transformers < 5.24 without psutil cannot size its "
                    "continuous-batching cache on CPU (install psutil)")
def test_paged_peer_reports_greedy_tokens_of_prompts_of_any_length(monkeypatch):
    model = tiny_model("llama")
    ids, _ = prompt(3, 12, padded=False)
    prompts = [ids[0].tolist(), ids[1, :5].tolist(), ids[2, :9].tolist()]
    clock = iter(range(1000))
    monkeypatch.setattr("bench.paged_peer.time.perf_counter", lambda: next(clock) ** 2 / 10)  # later runs take longer
    # A small cache: sized from the host's memory, its attention mask (tokens x cache positions,
    # pinned where a GPU is present) would be gigabytes for a model on the CPU.
    r = run_paged(torch, model, [prompts, [p + p[:2] for p in prompts]], 6,
                  cache_options={"num_blocks": 16, "max_batch_tokens": 64})
    expected = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=-1)[0, len(p):].tolist()
                for p in prompts]
    assert r["ok"] and r["full_length"] and r["tokens"] == expected
    assert r["contexts"] == [12, 14] and r["repeats"] == 2 and r["decode_tok_s"] > 0


def test_an_unmeasurable_decode_time_is_an_error_not_a_speed(monkeypatch):
    class Model:
        config = type("Config", (), {"vocab_size": 10, "pad_token_id": 0})()

        def generate_batch(self, inputs, generation_config, progress_bar):
            return {f"req_{i}": type("Out", (), {"generated_tokens": [1] * generation_config.max_new_tokens})()
                    for i in range(len(inputs))}

    monkeypatch.setattr("bench.paged_peer.time.perf_counter", lambda: 0.0)  # every run as fast as the prompt's
    r = run_paged(torch, Model(), [[[1, 2], [3]]], 4)
    assert not r["ok"] and "not measurable" in r["error"]


def test_every_repeats_prompts_run_once_untimed_and_the_warm_up_is_the_first_repeats(monkeypatch):
    """The runs per repeat: the warm-up (2 tokens) on the first repeat's prompts, then for each
    repeat one untimed run of its prompts unless the warm-up already ran them, the timed prompt
    step and the timed decode; a long prompt's prefill is most of a sweep point's time."""
    runs = []

    class Model:
        config = type("Config", (), {"vocab_size": 10, "pad_token_id": 0})()

        def generate_batch(self, inputs, generation_config, progress_bar):
            runs.append((len(inputs[0]), generation_config.max_new_tokens))
            return {f"req_{i}": type("Out", (), {"generated_tokens": [1] * generation_config.max_new_tokens})()
                    for i in range(len(inputs))}

    clock = iter(range(1000))
    monkeypatch.setattr("bench.paged_peer.time.perf_counter", lambda: next(clock) ** 2 / 10)
    r = run_paged(torch, Model(), [[[1, 2]], [[1, 2, 3]]], 4)
    assert r["ok"]
    assert runs == [(2, 2), (2, 1), (2, 4), (3, 1), (3, 1), (3, 4)]

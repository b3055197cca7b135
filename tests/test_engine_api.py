"""The transformers backend's contract, no model needed: the admission rule behind every 429 of
kaito-serve, and the engine's settings (`transformers:` in inference_config.yaml)."""

from __future__ import annotations

import pytest
from kaito.presets import InferenceConfig, PresetError
from kaito.runtime.engine_api import has_room


def test_has_room_counts_the_batch_plus_the_waiting_room():
    # batch of 4, 2 may wait: 6 sequences at once
    assert has_room(0, 0, 4, 2)
    assert has_room(4, 1, 4, 2) and not has_room(4, 2, 4, 2)
    assert has_room(3, 0, 4, 2, n=3) and not has_room(3, 0, 4, 2, n=4)  # all of a request's sequences fit, or none
    assert not has_room(1, 0, 1, 0)  # no waiting room: a full batch refuses
    assert not has_room(0, 0, 4, 2, n=7)


@pytest.mark.parametrize("yaml_text, message", [
    ("transformers:\n  dtype: bf16\n",
     "transformers.dtype: Input should be 'bfloat16', 'float16', 'float32' or 'auto'"),
    ("transformers:\n  device: cuda:1\n", "transformers.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("transformers:\n  load_in_4bit: true\n  load_in_8bit: true\n", "load_in_4bit and load_in_8bit exclude each other"),
    ("transformers:\n  device: cpu\n  load_in_4bit: true\n", "load_in_4bit needs a CUDA GPU"),
    ("transformers:\n  max_batch_size: 0\n", "transformers.max_batch_size"),
    ("transformers:\n  max_waiting: -1\n", "transformers.max_waiting"),
    ("transformers:\n  max_model_len: 8\n", "transformers.max_model_len"),
])
def test_settings_the_engine_cannot_run_are_refused_when_read(yaml_text, message):
    with pytest.raises(PresetError, match="inference_config.yaml: ") as err:
        InferenceConfig.parse(yaml_text)
    assert message in str(err.value)

